"""The compression search: Optuna over students, pruning, low-rank and precision, judged on the target runtime."""
