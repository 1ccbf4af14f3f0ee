# The report of whatever finished: every method run OUT/settings.json marks done, its evaluations, the
# frontier plot and report.py's tables (train.run_report needs every run of its sweeps done).
import os, sys
sys.path.insert(0, ".")
import report
from checkpoint import read_json, write_jsonl
out, dest = sys.argv[1], sys.argv[2]
records = read_json(os.path.join(out, "settings.json"))["records"]
done = [name for name, r in records.items() if r["stage"] == "methods" and r["done"]]
unfinished = [name for name, r in records.items() if r["stage"] == "methods" and not r["done"]]
rows = []
for name in done:
    rows += sorted(report.read_rows(os.path.join(out, name, "eval.jsonl")), key=lambda r: r["step"])
means = report.over_seeds(rows)
write_jsonl(os.path.join(dest, "results.jsonl"), rows)
report.plot_frontier(means, os.path.join(dest, "frontier.png"))
text = "\n".join(["runs done: " + ", ".join(done), "runs not finished: " + ", ".join(unfinished), ""]
                 + report.frontier_table(means) + [""] + report.kl_budget_table(rows) + [""] + report.implicit_table(means))
print(text)
with open(os.path.join(dest, "report.md"), "w") as f:
    f.write(text + "\n")
