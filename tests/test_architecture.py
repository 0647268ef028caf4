"""The picture of the training loop in docs/architecture.md stays true to the code."""

import inspect
import re
from pathlib import Path

from cnnkit.training import Hook
from cnnkit.training import hooks as hooks_module
from cnnkit.training.budget_hook import TimeBudget
from cnnkit.training.run import standard_hooks

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_the_architecture_page_draws_every_hook_point_and_no_other():
    points = {name for name in vars(Hook) if name.startswith(("on_", "before_", "after_"))}
    drawn = set(re.findall(r"\b((?:on|before|after)_[a-z]+(?:_[a-z]+)?)\b", DOC.read_text()))
    assert points == drawn


def test_the_hook_table_lists_the_standard_hooks_in_their_order():
    table = re.findall(r"^\| `(\w+)` \|", DOC.read_text(), re.M)
    source = inspect.getsource(standard_hooks)
    assert table == sorted(table, key=source.index)  # the order standard_hooks builds them in
    classes = {name for name, obj in vars(hooks_module).items() if inspect.isclass(obj) and issubclass(obj, Hook)}
    assert set(table) == (classes | {TimeBudget.__name__}) - {"Hook"}
