"""Decision head: the released checkpoint on CPU vs a hand computation, the appendix variant, thresholds, errors."""

import pytest
import torch

from gill_hf.decision import (decide, decision_features, head_from_file, load_decision_head,
                              load_decision_state_dict, retrieve_probabilities)

RELEASED = "/work/shared/data/gill-release/decision_model.pth.tar"


def test_released_decision_model_matches_hand_computation():
    state = load_decision_state_dict(RELEASED)
    weight, bias = state["1.weight"], state["1.bias"]
    assert weight.shape == (2, 4096) and weight.device.type == "cpu"
    torch.testing.assert_close(bias, torch.tensor([-0.0100, -0.0029]), atol=1e-4, rtol=0)
    assert weight.norm().item() == pytest.approx(2.999, abs=1e-3)
    head = head_from_file(RELEASED).train()  # dropout must not apply at decision time whatever the mode
    x = torch.randn(5, 4096, generator=torch.Generator().manual_seed(0))
    logits = x @ weight.t() + bias
    by_hand = torch.exp(logits[:, 1]) / torch.exp(logits).sum(1)  # P(ret), label 1 = ret
    torch.testing.assert_close(retrieve_probabilities(head, x), by_hand, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(retrieve_probabilities(head, x), retrieve_probabilities(head, x))


def test_decide_thresholds_and_labels(make_model):
    model = make_model("opt").eval()
    states = torch.randn(4, model.config.llm_feature_dim)
    linear = model.adapter.decision_head[1]
    p = torch.softmax(linear(states), -1)[:, 1]
    decisions = decide(model, states)
    assert [d.mode for d in decisions] == ["ret" if v > model.config.decision_threshold else "gen" for v in p]
    assert [d.p_retrieve for d in decisions] == pytest.approx(p.tolist(), abs=1e-6)
    assert {d.mode for d in decide(model, states, threshold=0.0)} == {"ret"}
    assert {d.mode for d in decide(model, states, threshold=1.0)} == {"gen"}


def test_appendix_variant_appends_max_similarity(make_model):
    model = make_model("opt", decision_use_retrieval_score=True).eval()
    f = model.config.llm_feature_dim
    assert model.adapter.decision_head[1].in_features == f + 1
    states, max_cos = torch.randn(3, f), torch.tensor([0.1, 0.5, 0.9])
    features = decision_features(states, max_cos, True)
    assert torch.equal(features[:, :f], states) and torch.equal(features[:, f], max_cos)
    linear = model.adapter.decision_head[1]
    expected = torch.softmax(linear(features), -1)[:, 1]
    assert [d.p_retrieve for d in decide(model, states, max_cos)] == pytest.approx(expected.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="maximum retrieval similarity"):
        decide(model, states)


def test_load_into_model_round_trip_and_width_errors(make_model, tmp_path):
    model = make_model("opt").eval()
    linear = model.adapter.decision_head[1]
    trained = {"1.weight": torch.randn_like(linear.weight), "1.bias": torch.randn_like(linear.bias)}
    path = tmp_path / "decision.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.items()}}, path)
    load_decision_head(model, path)
    assert torch.equal(linear.weight, trained["1.weight"]) and torch.equal(linear.bias, trained["1.bias"])
    with pytest.raises(ValueError, match="4096 features but this model's takes 64"):
        load_decision_head(model, RELEASED)
    torch.save({"state_dict": {"fc.weight": trained["1.weight"]}}, path)
    with pytest.raises(ValueError, match=r"expected \['1.weight', '1.bias'\]"):
        load_decision_state_dict(path)
    with pytest.raises(ValueError, match="takes 65 features, got 64"):
        retrieve_probabilities(make_model("opt", decision_use_retrieval_score=True).adapter.decision_head,
                               torch.randn(2, 64))
