"""The reverse-distillation fit: one-pass moments (`moments`), the closed-form chain (`chain`), and the fit
artifact on disk (`artifact`). `moments` and `chain` are pure mathematics and do no I/O."""
