"""The emoji proving ground: the data builder, the embedded miniature Stable Diffusion (minisd),
its image tower and the evaluator that scores identity on emoji. Nothing in the method imports it."""
