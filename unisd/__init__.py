"""UniSD: self-distillation of language models as a cached, tracked workflow (see README.md)."""
