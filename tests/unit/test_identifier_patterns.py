"""Names checked against a pattern are checked whole: Python's ``$`` also matches before a
final newline, so ``re.match`` let ``"brick\\n"`` pass as a category, a version or an item
id (a folder name with a newline in it, written by export or recalibrate)."""

from __future__ import annotations

import pytest

from models.publish import check_version_name
from models.recalibrate import RecalibrationError, check_settings
from models.review_index import parse_id
from models.review_store import ItemNotFound, ReviewStore

ITEM_ID = "20261206T235959000000-ng-0000001234-0123456789ab"


def test_a_trailing_newline_is_not_part_of_a_valid_name(tmp_path) -> None:
    check_settings("brick", 0.99, 0.1)
    with pytest.raises(RecalibrationError):
        check_settings("brick\n", 0.99, 0.1)
    assert check_version_name("2") == "2"
    with pytest.raises(ValueError):
        check_version_name("2\n")
    assert parse_id(ITEM_ID) is not None and parse_id(ITEM_ID + "\n") is None
    store = ReviewStore(tmp_path)
    with pytest.raises(ItemNotFound):
        store._category_dir("brick\n")
    assert store._category_dir("brick") == tmp_path / "brick"
