"""The training application: run settings (settings), the recipe (setup / train / merge / test), the run directory
(runs), model and tokenizer loading, the two kinds of runs (task), the Trainer hooks (trainer, trainer_deepspeed)
and the process group of a launch (launch)."""
