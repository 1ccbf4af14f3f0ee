# The report of whatever finished: every method run OUT/settings.json marks done, its evaluations, the
# frontier plot and train.py's tables (train.run_report needs every run of its sweeps done).
import os, sys
sys.path.insert(0, ".")
import train
from checkpoint import read_json, write_jsonl
from evaluate import plot_frontier
out, dest = sys.argv[1], sys.argv[2]
records = read_json(os.path.join(out, "settings.json"))
order = list(train.METHOD_GROUPS["figure2"])
done = [name for name, r in records.items() if r["stage"] == "methods" and r["done"]]
unfinished = [name for name, r in records.items() if r["stage"] == "methods" and not r["done"]]
rows = []
for name in done:
    rows += sorted(train.read_rows(os.path.join(out, name, "eval.jsonl")), key=lambda r: r["step"])
write_jsonl(os.path.join(dest, "results.jsonl"), rows)
plot_frontier(rows, os.path.join(dest, "frontier.png"))
final = {}
for row in rows:
    key = (row["method"], row["setting"])
    if key not in final or row["step"] >= final[key]["step"]:
        final[key] = row
text = "\n".join(["runs done: " + ", ".join(done), "runs not finished: " + ", ".join(unfinished), ""]
                 + train.frontier_table(final.values()) + [""] + train.kl_budget_table(rows) + [""] + train.implicit_table(rows))
print(text)
with open(os.path.join(dest, "report.md"), "w") as f:
    f.write(text + "\n")
