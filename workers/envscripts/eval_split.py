"""The rows LLaMA-Factory holds out of a run (training environment): stdin {"rows", "val_size",
"seed"} -> stdout {"test": [indices]}. The same call as llamafactory/data/data_utils.py
split_dataset: `dataset.train_test_split(test_size=val_size, seed=seed)`, val_size an int when
above 1, on a dataset of as many rows (its rows are the indices)."""

import json
import sys

from datasets import Dataset

request = json.load(sys.stdin)
val_size = request["val_size"]
val_size = int(val_size) if val_size > 1 else val_size
split = Dataset.from_dict({"i": list(range(int(request["rows"])))}).train_test_split(
    test_size=val_size, seed=int(request["seed"]))
print(json.dumps({"test": list(split["test"]["i"])}))
