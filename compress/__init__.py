"""slimforge compression: transforms of a bare ``nn.Module`` applied before ``accelerator.prepare``."""
