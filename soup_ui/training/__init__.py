"""Training: the generic shard finetune (`train`), imagefolder data (`data`) and the embedded
default's end-to-end recipe (`recipes.emoji`). Imports the model files and below.
"""
