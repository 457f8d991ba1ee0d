#!/usr/bin/env python3
"""Checks that every crate the workspace resolves (Cargo.lock, all targets) may be
linked into an Apache-2.0 program: its `license` expression (SPDX; `/` is the old
spelling of OR) must be satisfiable with the licences allowed below. A copyleft
licence (GPL, AGPL, LGPL, ...) is acceptable only as one alternative of an OR.

    scripts/licenses.py            # check; exits 1 and names the crates that fail
    scripts/licenses.py --summary  # also print how many crates use each expression

Runs offline from Cargo.lock and the registry cache (`cargo metadata --offline`).
Known advisories (RustSec) are not checked here: the advisory database is a git
repository, which these machines cannot reach.
"""

import json
import re
import subprocess
import sys
from collections import Counter

# Permissive licences compatible with distributing mailmesh under Apache-2.0.
ALLOWED = {
    "0BSD",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-1-Clause",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "BSL-1.0",
    "CC0-1.0",
    "CDLA-Permissive-2.0",
    "ISC",
    "MIT",
    "MIT-0",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "Unlicense",
    "Zlib",
}


def tokens(expression):
    spelled = expression.replace("/", " OR ")
    return re.findall(r"\(|\)|[A-Za-z0-9.+-]+", spelled)


def satisfiable(expression):
    """Whether the SPDX expression can be met with ALLOWED licences only."""
    toks = tokens(expression)
    pos = 0

    def atom():
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if tok == "(":
            value = disjunction()
            if pos >= len(toks) or toks[pos] != ")":
                raise ValueError(f"unbalanced parentheses in {expression!r}")
            pos += 1
            return value
        name = tok
        if pos < len(toks) and toks[pos] == "WITH":
            name = f"{name} WITH {toks[pos + 1]}"
            pos += 2
        return name in ALLOWED

    def conjunction():
        nonlocal pos
        value = atom()
        while pos < len(toks) and toks[pos] == "AND":
            pos += 1
            value = atom() and value
        return value

    def disjunction():
        nonlocal pos
        value = conjunction()
        while pos < len(toks) and toks[pos] == "OR":
            pos += 1
            value = conjunction() or value
        return value

    value = disjunction()
    if pos != len(toks):
        raise ValueError(f"cannot read {expression!r}")
    return value


def main():
    metadata = json.loads(
        subprocess.run(
            # Not --offline: metadata names every platform's dependencies, which a
            # fresh machine's build never downloaded (android_system_properties…).
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            check=True,
            capture_output=True,
        ).stdout
    )
    failed = []
    seen = Counter()
    for package in metadata["packages"]:
        expression = package.get("license")
        seen[expression] += 1
        try:
            ok = expression is not None and satisfiable(expression)
        except (ValueError, IndexError) as e:
            ok = False
            expression = f"{expression} ({e})"
        if not ok:
            failed.append(f"{package['name']} {package['version']}: {expression or 'no licence field'}")
    if "--summary" in sys.argv:
        for expression, count in seen.most_common():
            print(f"{count:5} {expression}")
    if failed:
        print("crates whose licence does not allow linking into mailmesh:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)
    print(f"licences: all {len(metadata['packages'])} crates allow linking into an Apache-2.0 program")


if __name__ == "__main__":
    # Self-check: the parser refuses what it must refuse.
    assert satisfiable("MIT OR Apache-2.0")
    assert satisfiable("(MIT OR Apache-2.0) AND Unicode-3.0")
    assert satisfiable("Apache-2.0 OR GPL-2.0-only")
    assert not satisfiable("GPL-2.0-only")
    assert not satisfiable("AGPL-3.0-only OR GPL-3.0-only")
    assert not satisfiable("MIT AND LGPL-2.1-or-later")
    main()
