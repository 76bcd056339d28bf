"""The wire schemas accept every example body of API.md and name the field of every bad one."""

import json
import math
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from dynamiccl.schemas import (
    MAX_BATCH_MEASUREMENTS,
    Algo,
    Collective,
    Context,
    Fabric,
    Measurement,
    MeasurementBatch,
    NcclConfig,
    RecommendRequest,
    RecommendResponse,
    SuggestRequest,
    SuggestResponse,
)

API_MD = Path(__file__).resolve().parents[3] / "shared" / "design" / "API.md"

FABRIC = {"gpu": "H100-SXM", "gpus_per_node": 8, "intra_node": "nvswitch",
          "inter_node": "ib-ndr400", "nics_per_node": 8, "nccl_version": "2.28.9"}
CONTEXT = {"collective": "allreduce", "nbytes": 67108864, "nranks": 16, "nnodes": 2}
CONFIG = {"algo": "ring", "proto": "ll128", "nchannels": 16}
MEASUREMENT = {"context": CONTEXT, "config": CONFIG, "latency_us": 812.5, "count": 20,
               "source": "inspector", "job_id": "llama8b-0412", "ts": 1764000000.0,
               "suggestion_id": "s-91f2"}


def error_locations(error: ValidationError) -> list[tuple]:
    return [tuple(e["loc"]) for e in error.errors()]


@pytest.mark.skipif(not API_MD.exists(), reason="shared design folder not beside the checkout")
def test_every_complete_json_example_in_api_md_validates():
    """Each JSON block of API.md that is a whole body parses into its model."""
    blocks = re.findall(r"```json\n(.*?)```", API_MD.read_text(), flags=re.S)
    parsed = []
    for block in blocks:
        try:
            parsed.append(json.loads(block))
        except json.JSONDecodeError:
            continue  # blocks with "..." placeholders are sketches, not bodies
    models = {frozenset(FABRIC): Fabric, frozenset(CONTEXT): Context, frozenset(CONFIG): NcclConfig}
    checked = 0
    for body in parsed:
        model = models.get(frozenset(body))
        if model is not None:
            model.model_validate(body)
            checked += 1
    assert checked >= 3


def test_api_md_bodies_validate():
    Fabric.model_validate(FABRIC)
    Measurement.model_validate(MEASUREMENT)
    MeasurementBatch.model_validate(
        {"fabric_id": "dgx-h100-a", "batch_id": "agent7-000123", "measurements": [MEASUREMENT]}
    )
    SuggestRequest.model_validate({"fabric_id": "dgx-h100-a", "contexts": [CONTEXT]})
    RecommendRequest.model_validate(
        {"fabric_id": "dgx-h100-a", "contexts": [{**CONTEXT, "weight": 120.0}]}
    )
    SuggestResponse.model_validate({"suggestions": [
        {"context": CONTEXT, "config": CONFIG, "kind": "explore", "suggestion_id": "s-91f2"}]})
    RecommendResponse.model_validate({
        "recommendations": [{"context": CONTEXT, "config": CONFIG, "predicted_latency_us": 701.2,
                             "default_latency_us": 812.5, "speedup": 1.16, "confidence": 0.93,
                             "samples": 41}],
        "env": {"NCCL_ALGO": "allreduce:ring;allgather:ring"},
        "tuner_config": "allreduce,0,65535,tree,ll,-1,2,16,-1,-1\n"})


def test_names_are_accepted_in_any_case_and_stored_lower_case():
    context = Context.model_validate({**CONTEXT, "collective": "AllReduce"})
    config = NcclConfig.model_validate({"algo": "NVLS_Tree", "proto": "LL128"})
    assert context.collective is Collective.allreduce
    assert config.algo is Algo.nvls_tree and config.proto.value == "ll128"
    assert Fabric.model_validate({**FABRIC, "intra_node": "NVSwitch"}).intra_node == "nvswitch"


def test_unknown_fabric_strings_are_kept():
    fabric = Fabric.model_validate({**FABRIC, "inter_node": "slingshot-11"})
    assert fabric.inter_node == "slingshot-11"


def test_all_null_config_is_the_nccl_default():
    assert NcclConfig().is_default and NcclConfig.model_validate({}).is_default
    assert not NcclConfig(nchannels=4).is_default


@pytest.mark.parametrize(
    ("model", "body", "location"),
    [
        (Context, {**CONTEXT, "nnodes": 32}, ()),
        (Context, {**CONTEXT, "nbytes": -1}, ("nbytes",)),
        (Context, {**CONTEXT, "nbytes": 10**30}, ("nbytes",)),
        (Context, {**CONTEXT, "nranks": 0}, ("nranks",)),
        (Context, {**CONTEXT, "collective": "allmagic"}, ("collective",)),
        (NcclConfig, {**CONFIG, "nchannels": 0}, ("nchannels",)),
        (NcclConfig, {**CONFIG, "nchannels": 65}, ("nchannels",)),
        (NcclConfig, {**CONFIG, "algo": "butterfly"}, ("algo",)),
        (NcclConfig, {**CONFIG, "proto": "ll64"}, ("proto",)),
        (Measurement, {**MEASUREMENT, "latency_us": 0}, ("latency_us",)),
        (Measurement, {**MEASUREMENT, "latency_us": math.nan}, ("latency_us",)),
        (Measurement, {**MEASUREMENT, "latency_us": math.inf}, ("latency_us",)),
        (Measurement, {**MEASUREMENT, "count": 0}, ("count",)),
        (Measurement, {**MEASUREMENT, "source": "guess"}, ("source",)),
        (Measurement, {**MEASUREMENT, "ts": math.inf}, ("ts",)),
        (Fabric, {**FABRIC, "gpus_per_node": 0}, ("gpus_per_node",)),
        (SuggestRequest, {"fabric_id": "bad id!", "contexts": [CONTEXT]}, ("fabric_id",)),
        (SuggestRequest, {"fabric_id": "x" * 129, "contexts": [CONTEXT]}, ("fabric_id",)),
        (SuggestRequest, {"fabric_id": "a", "contexts": []}, ("contexts",)),
        (SuggestRequest, {"fabric_id": "a", "contexts": [CONTEXT], "round": -1}, ("round",)),
        (RecommendRequest, {"fabric_id": "a", "contexts": [{**CONTEXT, "weight": -1}]},
         ("contexts", 0, "weight")),
        (MeasurementBatch, {"fabric_id": "a", "batch_id": "", "measurements": []}, ("batch_id",)),
    ],
)
def test_malformed_bodies_name_the_field(model, body, location):
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    assert any(loc[: len(location)] == location for loc in error_locations(caught.value))


def test_nnodes_above_nranks_says_so():
    with pytest.raises(ValidationError, match=r"nnodes \(32\) must be <= nranks \(16\)"):
        Context.model_validate({**CONTEXT, "nnodes": 32})


def test_batch_size_is_capped():
    body = {"fabric_id": "a", "batch_id": "b", "measurements": [MEASUREMENT] * (MAX_BATCH_MEASUREMENTS + 1)}
    with pytest.raises(ValidationError) as caught:
        MeasurementBatch.model_validate(body)
    assert caught.value.errors()[0]["type"] == "too_long"
