"""Model families: one small adapter per supported decoder family (`base.FamilyAdapter` and its subclasses), holding
what differs between them (norm formula, embedding scale, sandwich norms, q/k norms, fused projections, per-layer
attention types), and `registry.adapter_for(config)`, which refuses an unsupported family in one line. Masking,
importance scoring, folding, calibrated init and every CLI's up-front check go through it; nothing else branches on
`model_type`. See docs/architecture.md ("Adding a model family").

Import from the modules: this package imports nothing itself (no torch)."""
