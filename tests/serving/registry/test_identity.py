from __future__ import annotations

from service.common.load.spec import DType, LoadRequest
from service.serving.registry.identity import derived_id, spec_key


def test_name_is_not_part_of_identity() -> None:
    a = LoadRequest(source="/m/Llama-Tiny", name="one")
    b = LoadRequest(source="/m/Llama-Tiny", name="two")
    assert spec_key(a) == spec_key(b)


def test_any_field_changes_identity() -> None:
    base = LoadRequest(source="/m/x")
    assert spec_key(base) != spec_key(base.model_copy(update={"dtype": DType.FLOAT16}))


def test_derived_id_is_readable_and_valid() -> None:
    spec = LoadRequest(source="/models/Meta Llama@3")
    model_id = derived_id(spec, spec_key(spec))
    assert model_id.startswith("meta-llama-3-")
    assert LoadRequest(source="/x", name=model_id).name == model_id
