"""slimforge training: configs, data, models, distillation and the Accelerate engine."""
