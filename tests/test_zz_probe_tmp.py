import random, pytest
from tests.fuzzing import hostile_inputs, _send, _problem
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_probe(client, seed):
    bad = []
    for case in hostile_inputs(random.Random(seed), 5):
        if case.family == "huge_rows" and case.target == "dataset":
            continue
        problem = _problem(case, _send(client, case))
        if problem:
            bad.append(f"{case.family}/{case.name}: {problem}")
    assert client.get("/api/v1/datasets").json() == [] and client.get("/api/v1/configs").json() == []
    assert not bad, "\n".join(bad)
