"""K independent models trained in one process by one step (`train.replicas`).

The state of K models (parameters, BatchNorm statistics, optimizer state, update counts) is stacked along a
new leading axis; `torch.func.vmap` runs the forward and backward of every replica on the same batch, and
the optimizer updates the stacked trees at once, its hyperparameters (peak lr, weight decay) held per
replica as state tensors (`optim.hyper`), so that K seeds or K swept values need one step:

    settings.py  what each replica is (init seed, lr, weight decay), stacking and taking the state apart
    step.py      the replicated train step
    report.py    per-replica metrics rows, TensorBoard runs and the summary table over replicas
"""
