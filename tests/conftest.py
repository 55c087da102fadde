import os

# Never reach a model hub from the tests: everything runs on tiny local models or shipped weights.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
