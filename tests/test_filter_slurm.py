"""slurm/filter.sbatch on the local 2-node Slurm cluster (scripts/slurm_cluster.sh): a 2-task job
array filters the two slices on the two nodes, the last task merges, and the kept/rejected files
are the ones a single process writes."""

import subprocess
import sys

import pytest
from test_filter import _outputs, filter_data
from test_slurm import _wait, cluster  # noqa: F401  (the module-scoped cluster fixture)

from conftest import REPO
from vlmtrain.filtering.defects import make_defect_dataset

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_two_slice_array_merges_to_the_one_process_result(cluster, tmp_path):  # noqa: F811
    d, env = cluster
    data = make_defect_dataset(tmp_path / "data")
    out = tmp_path / "array"
    res = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--nodes=1", "--cpus-per-task=1", "--time=15",
                          str(REPO / "slurm" / "filter.sbatch"), "data=single", f"data.path={data}", f"out={out}",
                          "filter.progress=false"],
                         env={**env, "VLMTRAIN_PYTHON": sys.executable}, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    infos = [_wait(env, f"{job}_{i}") for i in range(2)]
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob(f"slurm-vlmtrain-filter-{job}_*.out")))
    assert all(i["JobState"] == "COMPLETED" and i["ExitCode"] == "0:0" for i in infos), logs[-4000:]
    assert "slice 0/2" in logs and "slice 1/2" in logs and logs.count(" records; data config: ") == 1, logs[-4000:]

    filter_data(data, tmp_path / "one")
    one, two = _outputs(tmp_path / "one"), _outputs(out)
    assert set(one) == set(two) and "single/rejected.jsonl" in one
    for name in one:
        assert one[name] == two[name].replace(str(out).encode(), str(tmp_path / "one").encode()), name
