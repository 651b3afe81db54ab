"""Training: the pretraining and fine-tuning stages and the parts they share."""

from lmkiln.pipeline import stage_runner

run_pretrain = stage_runner("pretrain")
run_finetune = stage_runner("finetune")
