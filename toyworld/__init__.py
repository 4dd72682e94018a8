"""A toy world for measuring personalisation exactly, and a small text-to-image model trained on it.

- `toyworld.world`: scenes (background colour, one or two flat-coloured shapes of a given colour,
  size and position), a deterministic anti-aliased renderer, captions, and the novel "sks" object
  that the pretraining data never shows.
- `toyworld.metrics`: reads a (generated) image back into the world's terms: background colour,
  objects (colour, shape, size, position) and a fidelity score to the sks object.
- `toyworld.pretrain`: trains the model (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, the
  SD 1.x layout) on the world from a seed and writes a StableDiffusionPipeline folder.
- `toyworld.evaluate`: samples prompts with that pipeline and measures how well it follows them.
- `toyworld.experiment`: the papers' one-image experiment (LoRA, Ortho-LoRA, TriLoRA, T-LoRA
  vanilla and full; min_rank and schedule-power sweeps), scored exactly; writes a results page.
- `toyworld.plot`: the results page's scatter plots, drawn with PIL.

Only numpy and PIL are needed for the world and the metrics; the model parts need torch,
diffusers and transformers.
"""
