"""TC-AE core library: tokenizer, trainer, evaluation. No orchestration code lives here."""
