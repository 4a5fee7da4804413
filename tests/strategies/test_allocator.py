"""Allocator settings: validated by key and value, applied on CUDA, reported and ignored on CPU."""

import pytest
import torch

import memwise
from memwise.core.errors import BadInputError
from memwise.strategies.allocator import parse_allocator_settings


def test_settings_are_parsed():
    assert parse_allocator_settings("expandable_segments:True, max_split_size_mb:128") == {
        "expandable_segments": "True", "max_split_size_mb": "128"}
    assert parse_allocator_settings("") == {}


@pytest.mark.parametrize("text,message", [
    ("expandable_segmnts:True", "expandable_segmnts:True.*keys expandable_segments, max_split_size_mb"),
    ("max_split_size_mb", "cannot read 'max_split_size_mb'"),
    ("expandable_segments:yes", "expandable_segments must be True or False, got 'yes'"),
    ("max_split_size_mb:big", "max_split_size_mb must be a number, got 'big'"),
    ("garbage_collection_threshold:1.5", "garbage_collection_threshold out of range"),
    ("max_split_size_mb:-1", "max_split_size_mb out of range"),
])
def test_bad_settings_name_the_key(text, message):
    with pytest.raises(BadInputError, match=message):
        parse_allocator_settings(text)
    # the same error when the recipe is applied, before anything is changed
    model = torch.nn.Linear(4, 4)
    with pytest.raises(BadInputError, match=message):
        memwise.apply_(model, memwise.Recipe(allocator=text))
    assert "forward" not in model.__dict__ and not model._forward_pre_hooks


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_settings_are_noted_and_ignored_on_cpu():
    model = torch.nn.Linear(4, 4)
    handle = memwise.apply_(model, memwise.Recipe(allocator="expandable_segments:True"))
    assert handle.notes == ["allocator settings 'expandable_segments:True' apply to CUDA only: ignored on this CPU"]
    handle.remove()
