import pytest
import torch

from lhf_torchrec.mapping import IdEmbeddings, fit_mapping, plan_budget, row_bytes
from lhf_torchrec.mapping.methods import MIN_COUNT


@pytest.mark.parametrize("method", ["hash", "frequency", "double_hash", "learned", "combination"])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_budget_identity(method, optimizer, zipf_profile):
    dim = 16
    full_bytes = zipf_profile.num_ids * row_bytes(dim, optimizer)
    budget = full_bytes // 10
    # Pure clustering of every id would spend the whole 10x budget on the mapping: the budget raises
    # the floor of 3 until the entries fit in their share.
    hyper = {"min_count": 3} if method == "learned" else {}
    plan = plan_budget(zipf_profile, embedding_dim=dim, total_bytes=budget, method=method, optimizer=optimizer, **hyper)
    # The parts add up, fit the budget, and one more row would not.
    assert plan.table_bytes == plan.num_rows * dim * 4
    assert plan.optimizer_bytes == plan.num_rows * (row_bytes(dim, optimizer) - dim * 4)
    assert plan.total_bytes == plan.table_bytes + plan.optimizer_bytes + plan.mapping_bytes <= budget
    bigger = plan_budget(zipf_profile, embedding_dim=dim, total_bytes=plan.total_bytes + row_bytes(dim, optimizer) - 1,
                         method=method, optimizer=optimizer, **hyper)
    assert bigger.num_rows == plan.num_rows
    split = plan.split
    assert split.num_hot + split.num_clustered + split.num_hashed == plan.num_rows or method == "learned"
    # The fitted mapping costs exactly what the plan said.
    embeddings = IdEmbeddings(zipf_profile.ids, torch.randn(zipf_profile.num_ids, 4, generator=torch.Generator().manual_seed(0)))
    mapping = fit_mapping(zipf_profile, method=method, total_bytes=budget, embedding_dim=dim, optimizer=optimizer,
                          embeddings=embeddings if method in ("learned", "combination") else None, **hyper)
    assert mapping.num_rows == plan.num_rows
    assert mapping.nbytes == plan.mapping_bytes
    assert mapping.num_entries == split.num_entries
    assert mapping.layout == split.layout()


def test_budget_that_cannot_hold_the_mapping(zipf_profile):
    with pytest.raises(ValueError, match="table 'C1': a budget of 10 bytes cannot hold method 'learned': its mapping alone needs 1 bytes and one row 64"):
        plan_budget(zipf_profile, embedding_dim=16, total_bytes=10, method="learned", table="C1")


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        row_bytes(16, "lamb")


def test_budget_and_num_rows_are_exclusive(zipf_profile):
    with pytest.raises(ValueError, match="exactly one of num_rows or total_bytes"):
        fit_mapping(zipf_profile, method="frequency", num_rows=10, total_bytes=1000, embedding_dim=4)
    with pytest.raises(ValueError, match="needs embedding_dim"):
        fit_mapping(zipf_profile, method="frequency", total_bytes=1000)


@pytest.mark.parametrize("method", ["learned", "combination"])
def test_budget_raises_min_count_until_the_mapping_fits_its_share(method, zipf_profile):
    budget = zipf_profile.num_ids * row_bytes(16) // 10
    plan = plan_budget(zipf_profile, embedding_dim=16, total_bytes=budget, method=method, min_count=1,
                       mapping_share=0.25)
    chosen = plan.hyperparams["min_count"]
    assert chosen > 1  # storing every id would not fit
    assert plan.mapping_bytes <= 0.25 * budget or method == "combination" and plan.split.num_hot >= plan.split.num_entries
    looser = plan_budget(zipf_profile, embedding_dim=16, total_bytes=budget, method=method, min_count=chosen - 1,
                         mapping_share=1.0)
    assert looser.hyperparams["min_count"] == chosen - 1
    assert looser.mapping_bytes > 0.25 * budget  # the smallest threshold that fits was chosen
    embeddings = IdEmbeddings(zipf_profile.ids, torch.randn(zipf_profile.num_ids, 4))
    mapping = fit_mapping(zipf_profile, method=method, total_bytes=budget, embedding_dim=16, embeddings=embeddings,
                          min_count=1, mapping_share=0.25)
    assert mapping.params["min_count"] == chosen and mapping.nbytes == plan.mapping_bytes


def test_min_count_default_is_a_floor_rarely_seen_ids_are_never_clustered(zipf_profile):
    roomy = zipf_profile.num_ids * row_bytes(16)  # every id's entry would fit
    unfloored = plan_budget(zipf_profile, embedding_dim=16, total_bytes=roomy, method="combination",
                            hot_fraction=0.02, min_count=1)
    assert unfloored.hyperparams["min_count"] == 1
    plan = plan_budget(zipf_profile, embedding_dim=16, total_bytes=roomy, method="combination", hot_fraction=0.02)
    assert plan.hyperparams["min_count"] == MIN_COUNT
    well_observed = int((zipf_profile.counts >= MIN_COUNT).sum())
    assert plan.split.num_hot < well_observed < zipf_profile.num_ids
    assert plan.split.num_entries == well_observed  # rarer ids have no entry: they are hashed
    with pytest.raises(ValueError, match="min_count must be an integer >= 1, got 0"):
        plan_budget(zipf_profile, embedding_dim=16, total_bytes=roomy, min_count=0)
    with pytest.raises(ValueError, match="min_count must be an integer >= 1, got 'auto'"):
        plan_budget(zipf_profile, embedding_dim=16, total_bytes=roomy, min_count="auto")
    with pytest.raises(ValueError, match="table 'table': mapping_share must be in"):
        plan_budget(zipf_profile, embedding_dim=16, total_bytes=roomy, mapping_share=0)


def test_num_rows_and_a_budget_give_the_same_mapping(zipf_profile):
    """One default per hyper-parameter: a budget that needs no higher min_count fits the mapping
    that ``num_rows`` alone gives (the same rows, the same clustered ids)."""
    roomy = zipf_profile.num_ids * row_bytes(16)
    embeddings = IdEmbeddings(zipf_profile.ids, torch.randn(zipf_profile.num_ids, 4))
    at_budget = fit_mapping(zipf_profile, method="combination", total_bytes=roomy // 4, embedding_dim=16,
                            embeddings=embeddings)
    by_rows = fit_mapping(zipf_profile, method="combination", num_rows=at_budget.num_rows, embeddings=embeddings)
    assert at_budget.params["min_count"] == by_rows.params["min_count"] == MIN_COUNT
    assert at_budget.fingerprint == by_rows.fingerprint
