"""Two real accelerate processes split the batches and merge exactly the single-process results."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from anomaly_assistant.eval import distributed

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from anomaly_assistant.eval import distributed

    def fn(batch):
        st = distributed.state()
        return [{"i": i, "v": float(np.sin(i) * 3), "rank": st.process_index} for i in batch]

    out = distributed.distributed_map(fn, list(range(11)), batch_size=3)
    if distributed.is_main_process():
        json.dump({"out": out, "n": distributed.num_processes()}, open(sys.argv[1], "w"))
''')


def test_batches_are_fixed_before_splitting():
    assert distributed.batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert distributed.batches([], 3) == []
    out = distributed.distributed_map(lambda b: [x * 2 for x in b], list(range(7)), batch_size=3)
    assert out == [0, 2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError):
        distributed.distributed_map(lambda b: b[:1], list(range(4)), batch_size=2)


def _launch(script, out, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29517", str(script), str(out)]
    subprocess.run(cmd, check=True, env=env, timeout=300, capture_output=True)
    return json.loads(out.read_text())


def test_two_processes_merge_in_order(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    one = _launch(script, tmp_path / "one.json", 1)
    two = _launch(script, tmp_path / "two.json", 2)
    assert one["n"] == 1 and two["n"] == 2
    assert {r["rank"] for r in two["out"]} == {0, 1}  # both processes did work
    strip = [{k: v for k, v in r.items() if k != "rank"} for r in two["out"]]
    assert strip == [{k: v for k, v in r.items() if k != "rank"} for r in one["out"]]
    assert [r["i"] for r in two["out"]] == list(range(11))
