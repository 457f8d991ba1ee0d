#!/usr/bin/env python3
"""Checks every crate that Cargo.lock resolves against known security advisories
(RustSec), offline, from the snapshot of the advisory database kept in
supply-chain/advisory-db/ (see the README there for where it comes from).

    scripts/advisories.py                  # check; exits 1 on a vulnerable crate version
    scripts/advisories.py --strict         # informational advisories (unsound,
                                           # unmaintained, notice) fail too
    scripts/advisories.py --allow-uncovered  # crates missing from the snapshot only warn
    scripts/advisories.py --self-test      # prove the check can fail, then exit
    scripts/advisories.py --refresh PATH   # rebuild the snapshot from a git clone of
                                           # github.com/rustsec/advisory-db (needs network
                                           # once, to clone; no other access)

A crate version is vulnerable when an advisory for that crate is not withdrawn and
the version matches none of its `patched` or `unaffected` requirements (cargo's semver
requirement rules). Informational advisories are warnings unless --strict.

The snapshot only knows the crates it was built for: a crate in Cargo.lock that has
neither a directory under supply-chain/advisory-db/crates/ nor a line in
supply-chain/advisory-db/no-advisories.txt is "not covered by the snapshot", and the
check fails for it (an unknown crate is not a clean one) until the snapshot is
refreshed or the crate is added after a look at the database.

Accepted advisories go in supply-chain/advisory-ignore.toml, each with a reason.
Python 3.11+ standard library only.
"""

import argparse
import datetime
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "supply-chain" / "advisory-db"
IGNORE_FILE = ROOT / "supply-chain" / "advisory-ignore.toml"
CRATES_IO = ("registry+https://github.com/rust-lang/crates.io-index", "sparse+https://index.crates.io/")
# Assigned ids only: RUSTSEC-0000-0000.md is the name of a not yet numbered draft.
ADVISORY_FILE = re.compile(r"^RUSTSEC-(?!0000-)\d{4}-\d{4}\.md$")
STALE_DAYS = 90

# ---------------------------------------------------------------- semver (cargo's rules)


class Version:
    """A semver version; build metadata is ignored, as cargo does for matching."""

    def __init__(self, text):
        m = re.fullmatch(r"\s*(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?\s*", text)
        if not m:
            raise ValueError(f"not a semver version: {text!r}")
        self.text = text.strip()
        self.major, self.minor, self.patch = (int(m.group(i)) for i in (1, 2, 3))
        self.pre = pre_key(m.group(4))

    def key(self):
        return (self.major, self.minor, self.patch, self.pre)

    def __repr__(self):
        return self.text


def pre_key(pre):
    """Orders pre-release tags as semver does; no pre-release sorts above any pre-release."""
    if not pre:
        return (1,)
    return (0, tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split(".")))


COMPARATOR = re.compile(
    r"\s*(=|>=|<=|>|<|~|\^)?\s*"
    r"(\d+|\*|x|X)(?:\.(\d+|\*|x|X))?(?:\.(\d+|\*|x|X))?"
    r"(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?\s*"
)


class Comparator:
    """One comparator of a requirement; a missing minor/patch is None (a partial version)."""

    def __init__(self, text):
        m = COMPARATOR.fullmatch(text)
        if not m:
            raise ValueError(f"not a version comparator: {text!r}")
        op, parts, pre = m.group(1), [m.group(2), m.group(3), m.group(4)], m.group(5)
        wild = [p is not None and p in "*xX" for p in parts]
        if any(wild):
            # "1.*", "1.2.x": the parts before the wildcard, as an exact partial version.
            cut = wild.index(True)
            if op not in (None, "="):
                raise ValueError(f"wildcard with an operator: {text!r}")
            parts, op, pre = parts[:cut] + [None] * (3 - cut), "=", None
        self.op = op or "^"  # a bare version is a caret requirement
        self.major = None if parts[0] is None else int(parts[0])
        self.minor = None if parts[1] is None else int(parts[1])
        self.patch = None if parts[2] is None else int(parts[2])
        if pre and self.patch is None:
            raise ValueError(f"pre-release on a partial version: {text!r}")
        self.pre = pre_key(pre)
        self.has_pre = bool(pre)

    def matches(self, v):
        if self.major is None:  # "*"
            return True
        op = self.op
        if op == "=":
            return self._exact(v)
        if op == ">":
            return self._greater(v)
        if op == ">=":
            return self._exact(v) or self._greater(v)
        if op == "<":
            return self._less(v)
        if op == "<=":
            return self._exact(v) or self._less(v)
        if op == "~":
            return self._tilde(v)
        return self._caret(v)

    # The helpers below follow the semver crate (what cargo and cargo-audit use).
    def _exact(self, v):
        if v.major != self.major:
            return False
        if self.minor is not None and v.minor != self.minor:
            return False
        if self.patch is not None and v.patch != self.patch:
            return False
        return v.pre == self.pre

    def _greater(self, v):
        if v.major != self.major:
            return v.major > self.major
        if self.minor is None:
            return False
        if v.minor != self.minor:
            return v.minor > self.minor
        if self.patch is None:
            return False
        if v.patch != self.patch:
            return v.patch > self.patch
        return v.pre > self.pre

    def _less(self, v):
        if v.major != self.major:
            return v.major < self.major
        if self.minor is None:
            return False
        if v.minor != self.minor:
            return v.minor < self.minor
        if self.patch is None:
            return False
        if v.patch != self.patch:
            return v.patch < self.patch
        return v.pre < self.pre

    def _tilde(self, v):
        if v.major != self.major:
            return False
        if self.minor is not None and v.minor != self.minor:
            return False
        if self.patch is not None and v.patch != self.patch:
            return v.patch > self.patch
        return v.pre >= self.pre

    def _caret(self, v):
        if v.major != self.major:
            return False
        if self.minor is None:
            return True
        if self.patch is None:
            return v.minor >= self.minor if self.major > 0 else v.minor == self.minor
        if self.major > 0:
            if v.minor != self.minor:
                return v.minor > self.minor
            if v.patch != self.patch:
                return v.patch > self.patch
        elif self.minor > 0:
            if v.minor != self.minor:
                return False
            if v.patch != self.patch:
                return v.patch > self.patch
        elif v.minor != self.minor or v.patch != self.patch:
            return False
        return v.pre >= self.pre

    def pre_compatible(self, v):
        return (self.major, self.minor, self.patch) == (v.major, v.minor, v.patch) and self.has_pre


class Requirement:
    """A requirement such as ">= 1.2.3, < 2": every comma-separated comparator must match."""

    def __init__(self, text):
        self.text = text
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"empty version requirement: {text!r}")
        self.comparators = [Comparator(p) for p in parts if p.strip() != "*"]

    def matches(self, version):
        v = version if isinstance(version, Version) else Version(version)
        if not all(c.matches(v) for c in self.comparators):
            return False
        # A pre-release only matches a requirement that names a pre-release of the same
        # major.minor.patch (so ">= 1.0" does not pull in 2.0.0-alpha).
        return v.pre == (1,) or any(c.pre_compatible(v) for c in self.comparators)

    def __repr__(self):
        return self.text


# ---------------------------------------------------------------- advisories


class Advisory:
    def __init__(self, path):
        text = path.read_text(encoding="utf-8")
        m = re.match(r"```toml\r?\n(.*?)\r?\n```", text, re.S)
        if not m:
            raise ValueError(f"{path}: no ```toml front matter")
        data = tomllib.loads(m.group(1))
        adv, versions = data["advisory"], data.get("versions", {})
        self.path = path
        self.id = adv["id"]
        self.package = adv["package"]
        self.date = str(adv.get("date", ""))
        self.url = adv.get("url") or next(iter(adv.get("references", [])), "")
        self.informational = adv.get("informational")
        self.withdrawn = adv.get("withdrawn")
        self.aliases = adv.get("aliases", [])
        self.patched = [Requirement(r) for r in versions.get("patched", [])]
        self.unaffected = [Requirement(r) for r in versions.get("unaffected", [])]
        affected = data.get("affected", {})
        self.only = ", ".join(f"{k}={'/'.join(affected[k])}" for k in ("os", "arch") if affected.get(k))
        body = text[m.end():]
        title = re.search(r"^#\s+(.+?)\s*$", body, re.M)
        self.title = title.group(1) if title else ""

    def affects(self, version):
        return not any(r.matches(version) for r in self.patched + self.unaffected)

    def fix(self):
        return ", ".join(map(str, self.patched)) if self.patched else "none (no fixed version)"


class Snapshot:
    def __init__(self, path=SNAPSHOT):
        self.path = path
        self.advisories = {}  # crate name -> [Advisory]
        for crate_dir in sorted((path / "crates").iterdir()):
            for f in sorted(crate_dir.iterdir()):
                if not ADVISORY_FILE.match(f.name):
                    continue
                a = Advisory(f)
                if a.package != crate_dir.name or f.name != f"{a.id}.md":
                    raise ValueError(f"{f}: id {a.id} / package {a.package} do not match its path")
                self.advisories.setdefault(crate_dir.name, []).append(a)
        self.clean = set()
        for line in (path / "no-advisories.txt").read_text().splitlines():
            name = line.split("#", 1)[0].strip()
            if name:
                self.clean.add(name)
        meta = path / "snapshot.toml"
        self.meta = tomllib.loads(meta.read_text()) if meta.exists() else {}

    def covers(self, name):
        return name in self.advisories or name in self.clean

    def describe(self):
        count = sum(len(v) for v in self.advisories.values())
        newest = max((a.date for v in self.advisories.values() for a in v), default="?")
        taken = self.meta.get("taken", "?")
        where = f", git commit {self.meta['commit'][:12]}" if self.meta.get("commit") else ""
        return (f"RustSec snapshot taken {taken}{where}: {count} advisories for "
                f"{len(self.advisories)} crates (newest {newest}), {len(self.clean)} crates with none")


# ---------------------------------------------------------------- Cargo.lock


def checked_packages(lock, patched_names):
    """Packages the advisory database speaks for: crates.io ones, and path crates that
    replace a crates.io crate through [patch.crates-io] (vendored copies)."""
    out, skipped = [], []
    for p in lock.get("package", []):
        source = p.get("source", "")
        if source.startswith(CRATES_IO) or (not source and p["name"] in patched_names):
            out.append(p)
        elif source:
            skipped.append(f"{p['name']} {p['version']} ({source.split('#')[0]})")
    return out, skipped


def dependents(lock):
    """(name, version) -> names of the packages that depend on it, for the report."""
    versions = {}
    for p in lock.get("package", []):
        versions.setdefault(p["name"], []).append(p["version"])
    rdeps = {}
    for p in lock.get("package", []):
        for dep in p.get("dependencies", []):
            parts = dep.split()
            name = parts[0]
            version = parts[1] if len(parts) > 1 else versions.get(name, ["?"])[0]
            rdeps.setdefault((name, version), []).append(f"{p['name']} {p['version']}")
    return rdeps


def patched_crates_io(cargo_toml):
    try:
        manifest = tomllib.loads(cargo_toml.read_text())
    except FileNotFoundError:
        return set()
    return set(manifest.get("patch", {}).get("crates-io", {}))


# ---------------------------------------------------------------- the check


class Result:
    def __init__(self):
        self.checked = 0
        self.vulnerable = []  # (package, advisory)
        self.warnings = []  # (package, advisory)
        self.ignored = []  # (package, advisory, reason)
        self.uncovered = []  # package
        self.withdrawn = 0
        self.skipped = []
        self.stale_ignores = []


def check(lock, snapshot, ignore, patched_names=()):
    r = Result()
    packages, r.skipped = checked_packages(lock, set(patched_names))
    used_ignores = set()
    for p in packages:
        r.checked += 1
        name, version = p["name"], Version(p["version"])
        if not snapshot.covers(name):
            r.uncovered.append(p)
            continue
        for a in snapshot.advisories.get(name, []):
            if a.withdrawn:
                r.withdrawn += 1
                continue
            if not a.affects(version):
                continue
            if a.id in ignore:
                used_ignores.add(a.id)
                r.ignored.append((p, a, ignore[a.id]))
            elif a.informational:
                r.warnings.append((p, a))
            else:
                r.vulnerable.append((p, a))
    r.stale_ignores = sorted(set(ignore) - used_ignores)
    return r


def report(r, lock, strict, allow_uncovered, out=sys.stdout):
    rdeps = dependents(lock)

    def line(p, a, label):
        print(f"{label} {p['name']} {p['version']}: {a.id} {a.title}", file=out)
        kind = f"informational: {a.informational}; " if a.informational else ""
        only = f"; affects only {a.only}" if a.only else ""
        print(f"    {kind}patched: {a.fix()}{only}", file=out)
        if a.url:
            print(f"    {a.url}", file=out)
        users = rdeps.get((p["name"], p["version"]), [])
        if users:
            more = f" and {len(users) - 4} more" if len(users) > 4 else ""
            print(f"    needed by: {', '.join(sorted(users)[:4])}{more}", file=out)

    for p, a in r.vulnerable:
        line(p, a, "VULNERABLE")
    for p, a in r.warnings:
        line(p, a, "ERROR (--strict)" if strict else "warning")
    for p in r.uncovered:
        label = "warning" if allow_uncovered else "NOT COVERED"
        print(f"{label} {p['name']} {p['version']}: not covered by the advisory snapshot "
              f"(new dependency?): refresh the snapshot or check the crate and add it "
              f"(supply-chain/advisory-db/README.md)", file=out)
    for p, a, reason in r.ignored:
        print(f"ignored {p['name']} {p['version']}: {a.id} ({reason})", file=out)
    for i in r.stale_ignores:
        print(f"warning: {i} in supply-chain/advisory-ignore.toml matches no crate in Cargo.lock any more", file=out)
    for s in r.skipped:
        print(f"note: not checked (not from crates.io): {s}", file=out)
    failures = len(r.vulnerable) + (len(r.warnings) if strict else 0) + (0 if allow_uncovered else len(r.uncovered))
    return failures


def load_ignore(path=IGNORE_FILE):
    if not path.exists():
        return {}
    ignore = tomllib.loads(path.read_text()).get("ignore", {})
    for k, v in ignore.items():
        if not re.fullmatch(r"RUSTSEC-\d{4}-\d{4}", k) or not str(v).strip():
            raise ValueError(f"{path}: entry {k!r} needs a RUSTSEC id and a reason")
    return ignore


# ---------------------------------------------------------------- refresh


def refresh(clone, lock, patched_names, snapshot_dir=SNAPSHOT):
    clone = Path(clone)
    if not (clone / "crates").is_dir():
        sys.exit(f"{clone} has no crates/ directory: give a clone of github.com/rustsec/advisory-db")
    packages, _ = checked_packages(lock, patched_names)
    names = sorted({p["name"] for p in packages})
    target = snapshot_dir / "crates"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    clean, count = [], 0
    for name in names:
        files = sorted(f for f in (clone / "crates" / name).glob("*.md") if ADVISORY_FILE.match(f.name))
        if not files:
            clean.append(name)
            continue
        (target / name).mkdir()
        for f in files:
            shutil.copyfile(f, target / name / f.name)
            count += 1

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(clone), *args], check=True,
                                  capture_output=True, text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit, commit_date = git("rev-parse", "HEAD"), git("log", "-1", "--format=%cs")
    header = [line for line in (snapshot_dir / "no-advisories.txt").read_text().splitlines()
              if line.startswith("#")] if (snapshot_dir / "no-advisories.txt").exists() else []
    (snapshot_dir / "no-advisories.txt").write_text("\n".join(header + clean) + "\n")
    (snapshot_dir / "sources.tsv").write_text(
        "file\tcommit\n" + "".join(f"{f.relative_to(snapshot_dir)}\t{commit}\n"
                                   for f in sorted(target.glob("*/*.md"))))
    (snapshot_dir / "snapshot.toml").write_text(
        "# Where and when this snapshot of the RustSec advisory database was taken.\n"
        "# scripts/advisories.py prints it with every run; --refresh rewrites it.\n"
        'source = "https://github.com/rustsec/advisory-db"\n'
        f"taken = {datetime.date.today().isoformat()}\n"
        'method = "git clone"\n'
        f'commit = "{commit}"\n'
        f'commit_date = "{commit_date}"\n')
    print(f"snapshot refreshed from {clone} (commit {commit or 'unknown'}): {count} advisories "
          f"for {len(names) - len(clean)} crates, {len(clean)} crates with none")


# ---------------------------------------------------------------- self-test

MATCHER_CASES = [
    # requirement, version, matches
    (">= 1.2.3, < 2", "1.2.3", True), (">= 1.2.3, < 2", "1.9.9", True),
    (">= 1.2.3, < 2", "2.0.0", False), (">= 1.2.3, < 2", "1.2.2", False),
    ("^0.3.5", "0.3.9", True), ("^0.3.5", "0.3.4", False), ("^0.3.5", "0.4.0", False),
    ("^1.2", "1.9.0", True), ("^1.2", "2.0.0", False), ("^1.2", "1.1.9", False),
    ("^0.0.3", "0.0.3", True), ("^0.0.3", "0.0.4", False), ("^ 0.24.3", "0.24.9", True),
    ("0.13.10", "0.13.11", True), ("0.13.10", "0.14.0", False),  # bare = caret
    ("=1.0.0", "1.0.0", True), ("=1.0.0", "1.0.1", False), ("= 0.12.0", "0.12.0", True),
    ("=0.15", "0.15.7", True), ("=0.15", "0.16.0", False),
    ("~1.2", "1.2.9", True), ("~1.2", "1.3.0", False), ("~1.2.3", "1.2.2", False), ("~1.2.3", "1.2.4", True),
    ("< 0.23", "0.22.9", True), ("< 0.23", "0.23.0", False),
    ("<= 0.22", "0.22.5", True), ("<= 0.22", "0.23.0", False),
    ("> 0.1.42, < 0.1.45", "0.1.43", True), ("> 0.1.42, < 0.1.45", "0.1.42", False),
    (">= 0", "0.0.1", True), (">= 2", "1.9.9", False), (">= 2", "2.0.0", True), ("*", "7.1.0", True),
    ("1.*", "1.4.0", True), ("1.*", "2.0.0", False),
    # pre-releases and build metadata
    (">= 0.104.0-alpha.6", "0.104.0-alpha.7", True), (">= 0.104.0-alpha.6", "0.104.0-alpha.5", False),
    (">= 0.103.12, < 0.104.0-alpha.1", "0.104.0-alpha.3", False),
    (">= 0.103.12, < 0.104.0-alpha.1", "0.103.17", True),
    (">= 1.0.0", "2.0.0-alpha.1", False),  # no opt-in to pre-releases
    (">= 2.0.0-alpha.8", "2.0.0-alpha.10", True),  # numeric, not lexical, pre-release order
    (">= 0.4.8, < 1.0.0-0", "0.4.8", True), (">= 0.4.8, < 1.0.0-0", "1.0.0", False),
    (">= 4.10.0", "4.10.0+2.12.1", True),
]

FAKE_LOCK = """
version = 4
[[package]]
name = "h2"
version = "0.4.15"
source = "registry+https://github.com/rust-lang/crates.io-index"
[[package]]
name = "time"
version = "0.3.46"
source = "registry+https://github.com/rust-lang/crates.io-index"
[[package]]
name = "anyhow"
version = "1.0.100"
source = "registry+https://github.com/rust-lang/crates.io-index"
[[package]]
name = "humantime"
version = "2.1.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
[[package]]
name = "surely-not-a-crate-in-the-snapshot"
version = "1.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
[[package]]
name = "my-app"
version = "0.1.0"
dependencies = ["h2", "time", "anyhow", "humantime", "surely-not-a-crate-in-the-snapshot"]
"""

CLEAN_LOCK = """
version = 4
[[package]]
name = "h2"
version = "0.4.20"
source = "registry+https://github.com/rust-lang/crates.io-index"
[[package]]
name = "time"
version = "0.3.47"
source = "registry+https://github.com/rust-lang/crates.io-index"
"""


def self_test(snapshot, verbose):
    for req, version, expected in MATCHER_CASES:
        got = Requirement(req).matches(version)
        assert got == expected, f"matcher: {req!r} on {version}: got {got}, want {expected}"
    assert not ADVISORY_FILE.match("RUSTSEC-0000-0000.md") and ADVISORY_FILE.match("RUSTSEC-2024-0421.md")
    # Every requirement in the snapshot parsed (Snapshot() would have raised otherwise).
    # A known-vulnerable lock fails, for the right reasons and only those.
    r = check(tomllib.loads(FAKE_LOCK), snapshot, ignore={})
    vulnerable = {(p["name"], p["version"], a.id) for p, a in r.vulnerable}
    assert ("h2", "0.4.15", "RUSTSEC-2026-0258") in vulnerable, vulnerable  # patched >= 0.4.16
    assert ("time", "0.3.46", "RUSTSEC-2026-0009") in vulnerable, vulnerable  # patched >= 0.3.47
    assert not any(n == "humantime" for n, _, _ in vulnerable), "withdrawn advisory reported"
    assert not any(n == "anyhow" for n, _, _ in vulnerable), "informational advisory counted as vulnerable"
    assert ("anyhow", "RUSTSEC-2026-0190") in {(p["name"], a.id) for p, a in r.warnings}, r.warnings
    assert [p["name"] for p in r.uncovered] == ["surely-not-a-crate-in-the-snapshot"], r.uncovered
    assert not any(p["name"] == "my-app" for p in r.uncovered), "workspace crate checked"
    sink = open("/dev/null", "w") if not verbose else sys.stdout
    assert report(r, tomllib.loads(FAKE_LOCK), strict=False, allow_uncovered=False, out=sink) > 0
    # An ignore entry silences exactly its advisory; --strict turns warnings into failures.
    r2 = check(tomllib.loads(FAKE_LOCK), snapshot, ignore={"RUSTSEC-2026-0258": "test"})
    assert {a.id for _, a, _ in r2.ignored} == {"RUSTSEC-2026-0258"}
    assert "RUSTSEC-2026-0258" not in {a.id for _, a in r2.vulnerable}
    assert report(check(tomllib.loads(CLEAN_LOCK), snapshot, {}), {}, True, False, out=sink) == 0
    return len(MATCHER_CASES)


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strict", action="store_true", help="informational advisories fail too")
    ap.add_argument("--allow-uncovered", action="store_true",
                    help="crates missing from the snapshot only warn (not for the gate)")
    ap.add_argument("--self-test", action="store_true", help="run the self-test verbosely and exit")
    ap.add_argument("--refresh", metavar="ADVISORY_DB_CLONE", help="rebuild the snapshot from a git clone")
    ap.add_argument("--lock", default=str(ROOT / "Cargo.lock"), help="the Cargo.lock to check")
    args = ap.parse_args()

    lock_path = Path(args.lock)
    lock = tomllib.loads(lock_path.read_text())
    patched_names = patched_crates_io(lock_path.parent / "Cargo.toml")
    if args.refresh:
        refresh(args.refresh, lock, patched_names)
        return 0

    snapshot = Snapshot()
    # The check proves on every run that it can fail (cheap: a few milliseconds).
    cases = self_test(snapshot, verbose=args.self_test)
    if args.self_test:
        print(f"self-test passed: {cases} version-requirement cases; a fake Cargo.lock with "
              f"known-vulnerable versions (h2 0.4.15, time 0.3.46) fails, a withdrawn and an "
              f"informational advisory do not count as vulnerable, an unknown crate is reported")
        return 0

    ignore = load_ignore()
    r = check(lock, snapshot, ignore, patched_names)
    print(f"advisories: {r.checked} crate versions in {lock_path.name} against the {snapshot.describe()}")
    taken = snapshot.meta.get("taken")
    if isinstance(taken, datetime.date) and (datetime.date.today() - taken).days > STALE_DAYS:
        print(f"warning: the snapshot is {(datetime.date.today() - taken).days} days old: advisories "
              f"published since are not known; refresh it (supply-chain/advisory-db/README.md)")
    failures = report(r, lock, args.strict, args.allow_uncovered)
    summary = (f"{len(r.vulnerable)} vulnerable, {len(r.warnings)} informational, "
               f"{len(r.uncovered)} not covered, {len(r.ignored)} ignored, {r.withdrawn} withdrawn skipped")
    if failures:
        print(f"advisories: FAILED ({summary})", file=sys.stderr)
        return 1
    print(f"advisories: ok ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
