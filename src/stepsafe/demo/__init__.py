"""A small JAX transformer trained with stepsafe checkpointing: the main job."""
