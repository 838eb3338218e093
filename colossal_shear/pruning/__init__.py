"""Structured pruning of Hugging Face decoders (every family of colossal_shear.models): hard-concrete L0 masks
(Sheared-LLaMA) held on a ramped target shape, masks applied to the standard HF model through hooks, folding into a
smaller plain HF model, one-shot importance / depth / random pruning (Minitron, OpenBA-V2). See docs/pruning.md.

Import from the modules (`shape`, `hard_concrete`, `masks`, `masked_model`, `constraint`, `fold`, `oneshot`,
`importance_init`, `config`): this package imports nothing itself, so reading `pruning.config` (every CLI does, for
`--help`) does not load torch."""
