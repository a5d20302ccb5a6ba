"""Data the tests write to files: one home for text a test and its fixtures must agree on."""

from __future__ import annotations

# The corpus of the CLI's recover tests: twelve unrelated sentences, whose words are also the
# vocabulary of the small BERT tokenizer built beside it (tests/cli/conftest.py).
TEXT = """The cat sat on the warm windowsill all afternoon.
Stock markets fell sharply after the announcement.
She planted tomatoes and basil in the spring garden.
The committee will publish its report next month.
A heavy storm closed the mountain roads overnight.
He learned to play the violin as a child.
The new library opens early on weekdays.
Researchers measured the temperature of the lake every hour.
Fresh bread smells wonderful in the morning.
The train to the coast was delayed by an hour.
Our team finally fixed the bug in the parser.
The museum displays paintings from the last century."""
