"""The optimizer: pure optax-style transforms over parameter trees (`transforms`), the eager steps'
in-place kernels (`inplace`), lr schedules, fp16 loss scaling, and the plan a run builds from its spec."""
