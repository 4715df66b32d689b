import pytest
import torch

from leanlm.engine.stop import StopStrings
from leanlm.errors import InvalidRequestError
from leanlm.sampling.sampler import Sampler, apply_repetition_penalty, min_p_filter, top_k_filter, top_p_filter
from leanlm.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2),
        dict(repetition_penalty=0),
        dict(stop=("",)),
        dict(seed="x"),
    ],
)
def test_invalid_params_raise_named_error(kwargs):
    with pytest.raises(InvalidRequestError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_stop_accepts_single_string():
    assert SamplingParams(stop="###").stop == ("###",)


def test_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [False, False, True, True]
    # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7: keep two
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [False, True, True, True]
    # min_p 0.2 of top prob 0.5 = 0.1: drops 0.05
    assert torch.isinf(min_p_filter(logits, 0.2)).tolist() == [False, False, False, True]


def test_top_p_keeps_order_independent_of_index():
    logits = torch.log(torch.tensor([0.05, 0.15, 0.5, 0.3]))
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [True, True, False, False]


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([2.0, -1.0, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 3.0]
    assert logits.tolist() == [2.0, -1.0, 3.0]  # input untouched


def test_greedy_and_seeded_sampling():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([], dtype=torch.long)
    assert Sampler(SamplingParams(temperature=0))(logits, seen) == int(logits.argmax())
    draws = [[Sampler(SamplingParams(temperature=1.0, seed=s))(logits, seen) for _ in range(1)] for s in (1, 1)]
    assert draws[0] == draws[1]
    sampler_a = Sampler(SamplingParams(temperature=1.0, seed=7))
    sampler_b = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [sampler_a(logits, seen) for _ in range(20)] == [sampler_b(logits, seen) for _ in range(20)]
    assert len({Sampler(SamplingParams(temperature=5.0, seed=s))(logits, seen) for s in range(30)}) > 1


def test_top_k_one_is_greedy():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    picks = {Sampler(SamplingParams(temperature=1.0, top_k=1, seed=s))(logits, torch.tensor([])) for s in range(10)}
    assert picks == {int(logits.argmax())}


def test_stop_strings_find_and_hold_back():
    stops = StopStrings(("###", "\nUser:"))
    assert stops.find("hello ##", 6) is None
    assert stops.find("hello ###", 8) == 6
    assert stops.safe_length("hello ##") == 6  # "##" could become "###"
    assert stops.safe_length("hello \nUs") == 6
    assert stops.safe_length("hello") == 5
    assert StopStrings(()).safe_length("abc") == 3
