"""Public types in hms_mgmt.models, wire types in hms_mgmt.wire: every wire type is still
importable from models (the same class), and either module may be imported first."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel

from hms_mgmt import models, wire


@pytest.mark.parametrize("name", wire.__all__)
def test_each_wire_type_is_importable_from_models_as_the_same_class(name: str) -> None:
    cls = getattr(wire, name)
    assert issubclass(cls, BaseModel) and cls.__module__ == "hms_mgmt.wire" and cls.__name__ == name
    assert getattr(models, name) is cls


def test_wire_all_lists_every_model_it_defines_and_models_defines_none_of_them() -> None:
    defined = {n for n, v in vars(wire).items() if isinstance(v, type) and v.__module__ == "hms_mgmt.wire"}
    assert defined == set(wire.__all__)
    assert not {n for n, v in vars(models).items() if isinstance(v, type) and v.__module__ == "hms_mgmt.wire"}


@pytest.mark.parametrize("first", ["hms_mgmt.wire", "hms_mgmt.models"])
def test_either_module_may_be_imported_first(first: str) -> None:
    code = f"import {first}; from hms_mgmt.models import Placement, ServiceStatus; from hms_mgmt.wire import ServiceState"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_names_are_still_attribute_errors() -> None:
    with pytest.raises(AttributeError):
        models.NoSuchModel  # noqa: B018
