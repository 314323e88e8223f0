#!/usr/bin/env python3
"""Fits y = a*x + b by ordinary least squares on the CSV a message carries.

pubrun runs this once per message on the `uploads` topic (see pubrun.toml):

  - the CSV text arrives in the environment variable CSV (the message data,
    templated with `{{ text }}`); a header row is optional, the first two
    columns are x and y, blank lines and lines starting with '#' are skipped;
  - NAME is the upload's name (the message attribute `name`);
  - the coefficients are printed (they land in the run's log and in the
    `log_tail` of the result message on `results`) and written as
    model.json in the current directory: the run's own working directory;
  - malformed CSV (a non-numeric value, fewer than two columns, fewer than
    two rows, all x equal) exits with code 2 and says which line is wrong,
    so the run ends `failed` with exit code 2.

Plain Python 3, no third-party packages.
"""
import csv
import io
import json
import math
import os
import sys


class BadCsv(Exception):
    pass


def read_points(text):
    points = []
    header_allowed = True
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise BadCsv(f"line {lineno}: expected at least two columns x,y; got {row!r}")
        try:
            x, y = float(row[0]), float(row[1])
        except ValueError:
            if header_allowed:  # the first non-blank row may be a header
                header_allowed = False
                continue
            raise BadCsv(f"line {lineno}: {row[0]!r}, {row[1]!r} are not both numbers")
        if not (math.isfinite(x) and math.isfinite(y)):
            raise BadCsv(f"line {lineno}: values must be finite numbers")
        header_allowed = False
        points.append((x, y))
    if len(points) < 2:
        raise BadCsv(f"need at least two data rows, found {len(points)}")
    return points


def fit(points):
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    if sxx == 0:
        raise BadCsv("all x values are equal; a line cannot be fitted")
    a = sxy / sxx
    b = my - a * mx
    ss_res = sum((y - (a * x + b)) ** 2 for x, y in points)
    ss_tot = sum((y - my) ** 2 for _, y in points)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"a": a, "b": b, "r2": r2, "n": n}


def main():
    name = os.environ.get("NAME", "upload.csv")
    text = os.environ.get("CSV")
    if text is None:
        if sys.stdin.isatty():
            print("fit.py: no CSV in $CSV and nothing on stdin", file=sys.stderr)
            return 2
        text = sys.stdin.read()
    try:
        model = fit(read_points(text))
    except BadCsv as e:
        print(f"fit.py: {name}: malformed CSV: {e}", file=sys.stderr)
        return 2
    model = {"name": name, "run_id": os.environ.get("PUBRUN_RUN_ID", ""), **model}
    print(f"{name}: y = {model['a']:.6g}*x + {model['b']:.6g}  (r^2 = {model['r2']:.4f}, n = {model['n']})")
    print(json.dumps(model))
    with open("model.json", "w") as f:
        json.dump(model, f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.join(os.getcwd(), 'model.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
