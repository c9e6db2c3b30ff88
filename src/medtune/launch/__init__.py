"""Starting the finetune stage on more than one process, node or machine.

torchrun.py: data parallelism on every GPU of a node (or several nodes) under torchrun.
worker.py: what each torchrun rank runs. slurm.py / pbs.py: batch scripts for `medtune submit`.
apptainer.py: the container command line the training processes run in.
"""
