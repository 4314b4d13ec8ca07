"""Demo data with injected defects of every rule's kind, beside clean look-alikes, for measuring
the rules' precision and recall (``tests/test_filter.py``, ``experiments/filter/precision_recall.py``).

    python -c "from vlmtrain.filtering.defects import make_defect_dataset; print(make_defect_dataset('/tmp/d'))"

``make_defect_dataset(out)`` writes ``out/annotations.jsonl`` (InternVL format: the shapes demo's
image, multi-image and text lines, plus text, image and video lines built here) and
``out/labels.json``: per line, the rule expected to reject it (``clean`` for none), the kind of
defect or look-alike. Look-alikes are what a careless rule would reject: long answers, numbered and
templated lists, code, markdown tables, Chinese paragraphs, rules and dot leaders, big numbers,
short VQA answers, video clips, images that are merely small or wide. Everything is a pure
function of the seed; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

from PIL import Image

from vlmtrain.data.synthetic import make_shapes_dataset

EN = [
    "The Industrial Revolution began in Britain in the late eighteenth century.",
    "Steam engines turned coal into motion and changed how goods were made.",
    "Photosynthesis converts light, water and carbon dioxide into sugar and oxygen.",
    "Chlorophyll absorbs red and blue light and reflects green light.",
    "A binary search halves the interval it looks at on every comparison.",
    "Its running time therefore grows with the logarithm of the input size.",
    "The Nile flows north through eleven countries before it reaches the Mediterranean.",
    "Rainfall in the Ethiopian highlands feeds the annual flood downstream.",
    "Vaccines train the immune system to recognise a pathogen before an infection.",
    "Memory cells keep that recognition for years after a single dose.",
    "Interest compounds when earnings are added back to the principal.",
    "Over long horizons small differences in rate lead to large differences in value.",
    "Plate tectonics explains why earthquakes cluster along certain lines.",
    "Where two plates meet, one may slide beneath the other and melt.",
    "The violin has four strings tuned in perfect fifths.",
    "Its body is usually carved from spruce on the top and maple on the back.",
    "A haiku traditionally has three lines of five, seven and five syllables.",
    "Many poets now treat that count as a guide rather than a rule.",
    "Good error messages name the file, the line and what was expected there.",
    "Tests that run in seconds get run far more often than tests that take an hour.",
    "The chart shows revenue rising steadily from the first quarter to the third.",
    "In the fourth quarter it dips slightly, mostly because of seasonal demand.",
    "The photograph was taken at dusk, so the sky fades from orange to deep blue.",
    "A cyclist crosses the bridge while two pedestrians wait at the corner.",
    "Sourdough rises because wild yeast and bacteria ferment the flour.",
    "A longer cold proof gives the bread a more sour and complex flavour.",
    "The mitochondrion produces most of the chemical energy a cell uses.",
    "Its inner membrane is folded into ridges that enlarge its surface.",
    "Latitude measures distance north or south of the equator in degrees.",
    "Longitude is measured east or west of the prime meridian at Greenwich.",
    "A hash table stores keys in buckets chosen by a hash of each key.",
    "Collisions are resolved by chaining entries or by probing nearby slots.",
    "The treaty was signed after months of negotiation between the delegations.",
    "Historians still debate which concessions mattered most to the outcome.",
    "Coral reefs cover a tiny share of the ocean floor yet shelter a quarter of marine species.",
    "Warmer water makes corals expel the algae that give them colour and food.",
    "A transformer layer mixes information across positions with attention.",
    "A feed-forward block then transforms each position on its own.",
    "The museum's new wing displays ceramics from the Song dynasty.",
    "Each bowl is lit from above so that the glaze shows its fine crackle.",
]
ZH = [
    "长江是中国最长的河流，全长约六千三百公里。",
    "它发源于青藏高原，向东流入东海。",
    "光合作用把光能转化为植物可以利用的化学能。",
    "叶绿素主要吸收红光和蓝光，因此叶子看起来是绿色的。",
    "二分查找每次比较后都把搜索范围缩小一半。",
    "因此它的运行时间随输入规模的对数增长。",
    "这张图片显示一只橙色的猫躺在窗台上晒太阳。",
    "窗外可以看到几棵树和一栋红色屋顶的房子。",
    "疫苗让免疫系统在感染之前就学会识别病原体。",
    "接种之后，记忆细胞可以保持这种识别能力很多年。",
    "复利是指把利息加入本金后继续计算利息。",
    "在很长的时间里，利率的小差别会带来很大的差距。",
    "唐诗讲究格律，每句的字数和平仄都有规定。",
    "李白和杜甫是唐代最有名的两位诗人。",
    "表格中第二季度的销售额比第一季度增长了百分之十二。",
    "第四季度略有下降，主要是季节性需求减少造成的。",
    "地震多发生在板块交界的地方。",
    "当两个板块相遇时，一个板块可能俯冲到另一个板块下面。",
    "好的错误信息应该说明文件、行号以及期望的内容。",
    "运行只需几秒钟的测试会被更频繁地执行。",
    "面包发酵是因为酵母把糖分解成二氧化碳和酒精。",
    "低温长时间发酵可以让面包的风味更加丰富。",
    "线粒体为细胞提供了大部分所需的能量。",
    "哈希表根据键的哈希值把数据放进不同的桶里。",
]
WORDS = ("river stone light market quiet signal engine garden winter harbor copper lantern meadow "
         "circuit ledger violet canyon orbit parcel thunder velvet saddle pepper glacier anchor "
         "mirror timber falcon cotton prairie rocket shadow summit tunnel willow ember marble "
         "ribbon pillar socket basket cobalt dune feather hollow ivory jungle kettle lemon").split()
CODE = [
    "```python\ndef mean(values):\n    if not values:\n        return None\n    total = 0\n    for v in values:\n"
    "        total += v\n    return total / len(values)\n\n\ndef median(values):\n    if not values:\n"
    "        return None\n    ordered = sorted(values)\n    mid = len(ordered) // 2\n    if len(ordered) % 2:\n"
    "        return ordered[mid]\n    return (ordered[mid - 1] + ordered[mid]) / 2\n```",
    "```javascript\nfunction debounce(fn, wait) {\n  let timer = null;\n  return function (...args) {\n"
    "    clearTimeout(timer);\n    timer = setTimeout(() => fn.apply(this, args), wait);\n  };\n}\n```\n"
    "The returned function restarts the timer on every call, so `fn` runs once the calls stop.",
    "```sql\nSELECT country, COUNT(*) AS orders, SUM(total) AS revenue\nFROM orders\n"
    "WHERE created_at >= '2024-01-01'\nGROUP BY country\nORDER BY revenue DESC\nLIMIT 10;\n```",
    "```c\n#include <stdio.h>\n\nint main(void) {\n    int grid[3][3] = {0};\n    for (int i = 0; i < 3; i++) {\n"
    "        for (int j = 0; j < 3; j++) {\n            grid[i][j] = i * 3 + j;\n        }\n    }\n"
    "    printf(\"%d\\n\", grid[2][2]);\n    return 0;\n}\n```",
]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Quito", "Hanoi", "Perth", "Cairo", "Dhaka", "Porto", "Accra",
          "Seoul", "Kyiv", "Doha", "Turin"]


def _paras(rng: random.Random, pool: list[str], sizes: list[int], sep: str = " ") -> str:
    """Paragraphs of distinct sentences (drawn without replacement over the whole answer: a clean
    answer never says the same sentence twice)."""
    drawn = iter(rng.sample(pool, sum(sizes)))
    return "\n\n".join(sep.join(next(drawn) for _ in range(k)) for k in sizes)


def _line(conv_q: str, answer: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": conv_q}, {"from": "gpt", "value": answer}], **extra}


def _clean_text(rng: random.Random) -> list[tuple[dict, str]]:
    out = []
    for _ in range(6):
        sizes = [rng.randint(4, 6) for _ in range(rng.randint(3, 5))]
        out.append((_line("Explain this topic in detail.", _paras(rng, EN, sizes)), "long answer"))
    for _ in range(3):
        out.append((_line("Write a long essay.", _paras(rng, EN, [5] * 7)), "very long answer"))
    for _ in range(4):
        steps = rng.sample(EN, 8)
        out.append((_line("List the key points.", "Key points:\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(steps))),
                    "numbered list"))
    for _ in range(4):
        rows = [f"- Item {i + 1}: the {rng.choice(WORDS)} costs {rng.randint(2, 99)} dollars in {rng.choice(CITIES)}."
                for i in range(12)]
        out.append((_line("Describe each item.", "\n".join(rows)), "templated list"))
    for code in CODE:
        out.append((_line("Write the code and explain it.", f"Here is an implementation:\n\n{code}\n"), "code"))
    for _ in range(4):
        rows = [f"| {c} | {rng.randint(100, 9999)} | {rng.uniform(0, 40):.1f} | {rng.choice(['yes', 'no'])} |"
                for c in rng.sample(CITIES, 10)]
        table = "| city | population (k) | mean temp (C) | coastal |\n|---|---|---|---|\n" + "\n".join(rows)
        out.append((_line("Summarise the data as a table.", table), "markdown table"))
    for _ in range(6):
        out.append((_line("请详细解释一下。", _paras(rng, ZH, [rng.randint(3, 5) for _ in range(3)], "")),
                    "chinese paragraphs"))
    out.append((_line("Format the document outline.",
                      "Contents\n" + "=" * 40 + "\nChapter 1 " + "." * 30 + " 5\nChapter 2 " + "." * 30 + " 17\n"
                      + "-" * 60 + "\n" + _paras(rng, EN, [3])), "rules and dot leaders"))
    out.append((_line("Show the nested code.", "```python\n" + "".join(
        " " * (4 * d) + f"if level_{d}:\n" for d in range(6)) + " " * 24 + "return 'deep'\n```"), "deep indentation"))
    out.append((_line("How big is a googol compared with a billion?",
                      "A billion is 1,000,000,000 and a trillion is 1,000,000,000,000; the probability is 0.001."),
                "big numbers with zeros"))
    for q, a in (("How many cats are there?", "0"), ("Is it raining?", "No."), ("Which option?", "B"),
                 ("Any red shapes?", "None of the shapes is red."), ("Result?", "Wow!!! That worked.")):
        out.append((_line(q, a), "short answer"))
    return out


def _loop(rng: random.Random, chinese: bool = False) -> str:
    if chinese:
        return rng.choice(ZH) + "我认为这个问题的答案是肯定的。" * rng.randint(6, 20)
    sentence = rng.choice(EN)
    return rng.choice(EN) + " " + " ".join([sentence] * rng.randint(3, 25))


def _defect_text(rng: random.Random) -> list[tuple[dict, str, str]]:
    out = []
    for _ in range(6):
        out.append((_line("Describe it.", _loop(rng)), "ngram_repetition", "sentence loop"))
    for _ in range(3):
        out.append((_line("描述一下。", _loop(rng, chinese=True)), "ngram_repetition", "chinese loop"))
    for _ in range(3):
        text = _paras(rng, EN, [4])
        out.append((_line("Explain.", f"{text} {text}"), "ngram_repetition", "answer written twice"))
    out.append((_line("Go on.", "I think " + "and then and then " * 30), "ngram_repetition", "phrase loop"))
    for _ in range(4):
        lines = rng.sample(EN, 5)
        dup = rng.choice(lines)
        out.append((_line("List them.", "\n".join(lines[:3] + [dup, lines[3], dup, dup, lines[4]])),
                    "repeated_lines", "duplicate lines"))
    for _ in range(3):
        run_on = " ".join(rng.choice(WORDS) for _ in range(rng.randint(300, 420)))
        out.append((_line("Describe the scene.", f"The scene shows {run_on} and more."), "sentence_length",
                    "run-on sentence"))
    blob = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(600))
    out.append((_line("What is the payload?", f"The payload is {blob}"), "sentence_length", "blob word"))
    for _ in range(2):
        long = ". ".join(" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(600))
        out.append((_line("Tell me everything.", long), "answer_length", "answer over 32k characters"))
    for a in ("Great!" + "!" * 60, "It is a baaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaad idea.", "哈" * 40,
              "What?" + "?" * 30):
        out.append((_line("React.", a), "char_run", "run of one character"))
    for a in ("The serial number is 0000000000000000000000.", "Values: " + ", ".join(["0"] * 25) + ".",
              "Matrix row: " + " ".join(["0"] * 20)):
        out.append((_line("Read the numbers.", a), "zero_run", "run of zeros"))
    for a in ("...", "[placeholder]", "TODO", "<unk>", "null", "<image>"):
        out.append((_line("Answer the question.", a), "placeholder_answer", "placeholder-only answer"))
    out.append(({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "   "}]}, "unreadable",
                "empty answer"))
    return out


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_video(path: Path, frames: int, seed: int) -> None:
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        for i in range(frames):
            frame = np.roll(base, i * 3, axis=1)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _media(rng: random.Random, out: Path, clean_images: list[str]) -> list[tuple[dict, str, str]]:
    (out / "media").mkdir(exist_ok=True)
    rows = []

    def img_line(rel: str, q: str = "What is in the image?", a: str = "A few coloured shapes on a plain background."):
        return _line(f"<image>\n{q}", a, image=rel)

    for k, (size, label, kind) in enumerate([((8, 8), "image_tiny", "8x8 image"), ((12, 12), "image_tiny", "12x12 image"),
                                             ((1600, 40), "image_aspect", "40:1 banner"),
                                             ((30, 1200), "image_aspect", "1:40 strip"),
                                             ((64, 20), "clean", "small but fine image"),
                                             ((1000, 80), "clean", "wide but fine image (12.5:1)")]):
        rel = f"media/size-{k}.png"
        noise = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))  # a plain colour has no pHash
        Image.frombytes("RGB", size, noise).save(out / rel)
        rows.append((img_line(rel), label, kind))
    for k, src in enumerate(rng.sample(clean_images, 3)):
        data = (out / src).read_bytes()
        rel = f"media/truncated-{k}.jpg"
        (out / rel).write_bytes(_jpeg(Image.open(out / src))[: len(data) // 2])
        rows.append((img_line(rel), "image_unreadable", "truncated JPEG"))
    picked = rng.sample(clean_images, 6)
    for k, src in enumerate(picked[:3]):
        rel = f"media/copy-{k}{Path(src).suffix}"
        shutil.copyfile(out / src, out / rel)
        rows.append((img_line(rel, "Describe the picture."), "duplicate_images", "exact copy of an earlier image"))
    for k, src in enumerate(picked[3:]):
        img = Image.open(out / src)
        rel = f"media/near-{k}.jpg"
        (out / rel).write_bytes(_jpeg(img.resize((int(img.width * 0.8), int(img.height * 0.8))), quality=60))
        rows.append((img_line(rel, "Describe the picture."), "duplicate_images", "resized, re-encoded copy"))
    for k in range(4):
        rel = f"media/clip-{k}.mp4"
        _write_video(out / rel, 16, k)
        rows.append((_line("<video>\nWhat moves in the clip?", "A noise pattern slides to the right.", video=rel),
                     "clean", "video clip"))
    for k in range(3):
        rel = f"media/broken-{k}.mp4"
        _write_video(out / rel, 16, 10 + k)
        buf = bytearray((out / rel).read_bytes())
        start = buf.find(b"mdat") + 8
        buf[start:start + (len(buf) - start) // 2] = bytes((len(buf) - start) // 2)  # container intact, frames gone
        (out / rel).write_bytes(bytes(buf))
        rows.append((_line("<video>\nWhat moves in the clip?", "A noise pattern slides to the right.", video=rel),
                     "video_frames", "video whose frames do not decode"))
    rows.append((img_line("media/missing.jpg"), "unreadable", "missing image file"))
    rows.append((_line("<image>\n<image>\nCompare them.", "They differ.", image=clean_images[0]), "unreadable",
                 "two placeholders, one image"))
    return rows


def make_defect_dataset(out: str | Path, seed: int = 0, clean_lines: int = 64) -> Path:
    """Write the dataset under ``out``; returns the annotation path (labels in ``labels.json``)."""
    out = Path(out)
    rng = random.Random(f"vlmtrain-filter-defects/{seed}")
    shapes = make_shapes_dataset(out, clean_lines, seed, split="filter")
    base = [json.loads(line) for line in shapes.read_text().splitlines()]
    shapes.unlink()
    clean_images = sorted({img for line in base for img in ([line["image"]] if isinstance(line.get("image"), str)
                                                           else line.get("image", []))})
    rows = [(line, "clean", "shapes demo line") for line in base]
    rows += [(line, "clean", kind) for line, kind in _clean_text(rng)]
    rows += _defect_text(rng)
    rows += _media(rng, out, clean_images)
    # the copies come after every line whose image they copy: the first occurrence is the one kept
    copies = [i for i in range(len(rows)) if rows[i][1] == "duplicate_images"]
    order = [i for i in range(len(rows)) if rows[i][1] != "duplicate_images"]
    rng.shuffle(order)
    last = max(k for k, i in enumerate(order) if rows[i][2] == "shapes demo line")
    tail = order[last + 1:] + copies
    rng.shuffle(tail)
    order = order[:last + 1] + tail
    lines, labels = [], []
    for i in order:
        obj, label, kind = rows[i]
        lines.append(json.dumps(obj, ensure_ascii=False))
        labels.append({"line": len(lines), "expected": label, "kind": kind})
    at = len(lines) // 3
    lines.insert(at, '{"conversations": [{"from": "human", "value": "broken')  # malformed JSON
    labels.insert(at, {"line": 0, "expected": "unreadable", "kind": "malformed JSON"})
    for k, lab in enumerate(labels):
        lab["line"] = k + 1
    path = out / "annotations.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n")
    return path



def evaluate(filter_out: str | Path, labels_path: str | Path, dataset: str) -> dict:
    """Precision and recall of a filter run over the defect dataset.

    Per rule: recall = lines labelled with the rule that it rejected / lines labelled with it;
    precision = lines it rejected that carry some defect / lines it rejected. Overall: any
    rejection against any defect. ``unreadable`` is the readers' verdict (malformed JSON, missing
    media, ...), counted like a rule. Clean look-alikes wrongly rejected are listed by kind.
    """
    labels = json.loads(Path(labels_path).read_text())
    fired: dict[int, set] = {}
    for line in (Path(filter_out) / dataset / "rejected.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        fired[row["line"]] = {r["rule"] for r in row["reasons"]}
    rules = sorted({lab["expected"] for lab in labels if lab["expected"] != "clean"}
                   | {r for s in fired.values() for r in s})
    per_rule = {}
    for rule in rules:
        labelled = [lab for lab in labels if lab["expected"] == rule]
        hits = [lab for lab in labels if rule in fired.get(lab["line"], ())]
        per_rule[rule] = {
            "labelled": len(labelled),
            "rejected": len(hits),
            "recall": sum(rule in fired.get(lab["line"], ()) for lab in labelled) / len(labelled) if labelled else None,
            "precision": sum(lab["expected"] != "clean" for lab in hits) / len(hits) if hits else None,
        }
    defects = [lab for lab in labels if lab["expected"] != "clean"]
    rejected = [lab for lab in labels if lab["line"] in fired]
    false = [lab for lab in rejected if lab["expected"] == "clean"]
    missed = [lab for lab in defects if lab["line"] not in fired]
    clean_kinds: dict[str, list] = {}
    for lab in labels:
        if lab["expected"] == "clean":
            k = clean_kinds.setdefault(lab["kind"], [0, 0])
            k[0] += 1
            k[1] += lab["line"] not in fired
    return {
        "lines": len(labels), "defects": len(defects), "clean": len(labels) - len(defects),
        "recall": (len(defects) - len(missed)) / len(defects), "precision": (len(rejected) - len(false)) / len(rejected),
        "per_rule": per_rule, "false_positives": false, "missed": missed,
        "clean_kinds": {k: {"lines": v[0], "kept": v[1]} for k, v in sorted(clean_kinds.items())},
    }
