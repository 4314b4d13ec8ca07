"""Build the small byte-level BPE tokenizer that vlmtrain ships in ``vlmtrain/assets/tokenizer``.

    python -m vlmtrain.assets.build_tokenizer            # rewrite the shipped copy
    python -m vlmtrain.assets.build_tokenizer /tmp/tok   # or write somewhere else

Tiny configs and tests need a tokenizer that needs no download and holds every marker of the
chat templates vlmtrain supports, so a template renders into one id per marker. Byte-level BPE
keeps any text (Chinese, emoji) lossless even though the vocabulary is only 2048 entries. The
build is deterministic (fixed corpus, fixed trainer settings), and a test checks the committed
files equal a fresh build, so the shipped asset can always be regenerated from this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmtrain.data.synthetic import COLOURS, POSITIONS, SHAPES

VOCAB_SIZE = 2048
"""All entries, special tokens included: the tiny model configs size their embeddings to it."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|pad|>",  # its own id: padding never collides with a real token (RECIPE pitfall)
    "<|im_start|>",
    "<|im_end|>",
    # InternVL, in the reference order
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    # phi3-chat
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    # llama3-chat
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    # internlm2-chat bos / eos
    "<s>",
    "</s>",
)
"""Ids 0.. in this order. ``<image>`` / ``<video>`` are not here: they are plain-text
placeholders in the data, replaced before tokenization."""

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"

ENGLISH = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single
step. It was a bright cold day in April, and the clocks were striking thirteen. Call me Ishmael.
All happy families are alike; each unhappy family is unhappy in its own way.

Once upon a time there was a small village at the edge of a great forest. The people who lived
there were farmers and weavers, and every morning they walked to the fields while the sun rose
behind the hills. Children played near the river, and old men sat in the square talking about
the weather, the harvest and the news from the city. In the evening the smell of bread came
from the bakery, and lights appeared one by one in the windows.

Science is the patient work of asking questions and testing answers. A good experiment changes
one thing at a time, measures the result carefully and is repeated until the pattern is clear.
When the data disagree with the theory, the theory must change. Scientists share their methods
so that others can check the work, find mistakes and build on what was learned.

Machine learning models learn patterns from examples. A language model reads text one token at a
time and predicts the next token. A vision model looks at pixels and finds edges, textures and
objects. When the two are joined, the model can answer questions about pictures, describe a scene,
read a chart or count the objects in a photograph. Training needs data, a loss function, an
optimizer and a great deal of computation; evaluation needs held-out data that the model never saw.

The weather today is warm and sunny, with a light breeze from the west. Tomorrow clouds will
gather in the afternoon and there may be rain in the evening. Temperatures will fall during the
night, so bring a coat if you go out late. Next week looks dry and cool.

Please open the window, put the book on the table and sit down. Could you tell me where the
station is? Turn left at the second street, walk past the library and the museum, and you will
see it on your right. Thank you very much! You are welcome. Have a nice day.

Mathematics describes quantity, structure, space and change. Two plus two is four; ten minus
three is seven; six times seven is forty-two; one hundred divided by four is twenty-five. A
triangle has three sides, a square has four equal sides and four right angles, and a circle has
no corners at all. The area of a rectangle is its width times its height.

History is full of explorers who crossed oceans and mountains. They carried maps, compasses and
food for many months. Some found new lands, others found only storms and hunger. Their letters
describe strange animals, tall trees, frozen rivers and the kindness of strangers.

Cooking is both an art and a science. Heat changes the texture of food, salt brings out flavour,
and acid balances sweetness. To make soup, chop onions, carrots and celery, cook them slowly in
oil, add water or stock, and simmer for an hour. Taste it, add pepper and herbs, and serve it hot.

The computer stores numbers as bits. A program is a list of instructions: read the input, check
the condition, repeat the loop, write the output and stop. When something goes wrong, read the
error message first, then look at the line it points to, and test the smallest example you can.

Music, painting and poetry give shape to feelings that are hard to say in plain words. A song can
be sad or joyful, slow or fast, quiet or loud. Artists often work for years before anyone notices,
and many of the most famous works were ignored when they were first made.

Questions help us learn: who, what, when, where, why, which and how. Who wrote this letter? What
time is it? When does the train leave? Where are my keys? Why is the sky blue? Which one do you
prefer? How many people came to the meeting? How much does it cost?

Animals live almost everywhere on Earth. Birds build nests in trees and on cliffs, fish swim in
rivers and oceans, and insects crawl under leaves and stones. Elephants remember their families
for decades, dolphins call each other by name, and bees dance to show where the flowers grow.
Wolves hunt together in packs, while a cat usually prefers to be alone.

The ocean covers most of our planet. Its deepest trenches are darker than night and colder than
ice, yet strange creatures survive there. Waves are made by wind, tides are pulled by the moon,
and currents carry warm water from the tropics towards the poles, shaping the climate of every
continent.

Space is enormous and mostly empty. The Sun is an ordinary star, one of billions in our galaxy,
and the galaxy is one of billions in the universe. Light from the nearest stars takes years to
reach us. Astronauts who orbit the Earth see sixteen sunrises every day and describe the planet
as a fragile blue marble floating in the dark.

Good health depends on sleep, exercise, friendship and simple food. Walking every day strengthens
the heart, vegetables and fruit provide vitamins, and drinking enough water keeps the body cool.
Doctors recommend washing hands often, visiting a dentist twice a year and resting when you feel
tired or unwell.

Football, tennis, swimming and running are popular sports around the world. A team wins by working
together: the players practise for hours, listen to the coach and learn from every defeat. Fans
cheer loudly in the stadium, wave flags and sing songs, hoping that their favourite club will
score a goal in the final minute.

Travelling by train is a pleasant way to see a country. Through the window you watch villages,
bridges, lakes, vineyards and snowy mountains slide past. Passengers read newspapers, drink coffee,
chat with neighbours or simply fall asleep. At each station people hurry along the platform with
suitcases, backpacks and umbrellas.

"Where have you been?" asked the teacher. "I missed the bus," replied the student, "so I had to
walk all the way from the market." "Next time, leave home earlier," she said kindly, "and please
bring your homework tomorrow." He nodded, sat down quietly and opened his notebook.

To plant a tree, choose a sunny place with good soil. Dig a hole twice as wide as the roots, place
the young tree gently inside, fill the hole with earth and press it down firmly. Water it well and
keep watering it during dry weeks. In a few years it will give shade, fruit and a home for birds.

Languages change slowly over centuries. New words are borrowed from neighbours, old words fall out
of use, and grammar becomes simpler or more complex. Writing systems differ too: some use letters
for sounds, others use characters for meanings, and a few mix both. Translating a poem is hard
because rhythm, rhyme and meaning rarely survive together.

Economics studies how people choose to use limited resources. Prices rise when demand grows faster
than supply and fall when shops have more goods than customers want. Governments collect taxes to
pay for schools, hospitals, roads and police, and banks lend money so that families can buy houses
and companies can build factories.

The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. Storms shook
the tower, rain hammered the glass and waves exploded against the rocks below, but the light never
failed. Sailors far out at sea saw its steady beam and knew exactly where the dangerous reef lay.

A library is a quiet building full of books, newspapers, magazines and maps. Librarians help
visitors find information, recommend novels, organise reading clubs for children and teach older
people how to use computers. Borrowing is free, but the books must be returned within three weeks.

Volcanoes form where melted rock rises from deep underground. Some erupt violently, throwing ash
and boulders high into the sky; others release rivers of glowing lava that flow slowly downhill.
Scientists monitor earthquakes, gases and the shape of the ground to warn nearby towns in time.

Every spring the market square fills with stalls selling cheese, honey, flowers, wooden toys and
handmade pottery. Musicians play guitars and violins, jugglers entertain the crowd, and the smell
of roasted chestnuts drifts between the tents. Neighbours meet, exchange gossip and complain
cheerfully about prices that were always lower when they were young.

Engineers design bridges to carry heavy loads safely for a century. They calculate forces, choose
steel or concrete, test models in wind tunnels and inspect every joint after construction. A
suspension bridge hangs its deck from cables stretched between towers; an arch bridge pushes its
weight sideways into the solid ground at both ends.
"""

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
    "hundred thousand million first second third fourth last"
)


def _demo_text() -> str:
    """Chat-template role names and the words of the synthetic shapes dataset, so both encode in
    few tokens. Roles and answers start a line (no leading space), hence their own lines."""
    colours, shapes = list(COLOURS), list(SHAPES)
    line_starts = ["system", "user", "assistant", *colours, *shapes, "yes", "no", "first", "second"]
    lines = ["\n".join(line_starts * 3), " ".join(line_starts)]
    lines += [_NUMBER_WORDS, " ".join(colours), " ".join(shapes), " ".join(s + "s" for s in shapes)]
    for colour in colours:
        lines.append(f"How many {colour} shapes are there? Is there a {colour} circle? Answer yes or no.")
        lines.append(f"Which image has a {colour} shape? Answer first or second.")
    for shape in shapes:
        lines.append(f"How many {shape}s are there? The {shape} is {' or '.join(colours)}.")
    for side, most in POSITIONS.items():
        lines.append(f"What colour is the {most} shape? Which shape is nearest the {side} edge?")
    lines += [
        "How many shapes are there? What shape is it? Answer circle, square or triangle.",
        "Image-1: Image-2: Which image has more shapes? Answer first or second.",
        "How many shapes are there in the two images together? What is 3 plus 4? 9 minus 2? 6 times 7?",
        "What colour do you get when you mix blue and yellow? What colour is fresh grass?",
        "The left, right, top, bottom, centre, middle, above, below, next to, between.",
    ]
    return "\n".join(lines) + "\n"


def training_corpus() -> list[str]:
    """The fixed text the merges are learnt from (paragraphs as separate sequences)."""
    return [p for p in (ENGLISH + "\n" + _demo_text()).split("\n\n") if p.strip()]


def build_backend_tokenizer() -> Tokenizer:
    """Train the ``tokenizers`` object.

    Pre-tokenization isolates every newline and every digit. Newlines: the encoder tokenizes a
    template's user block (ending in ``\\n``) and the answer separately, which equals tokenizing
    the joined text only if no token spans a newline. Digits: one token per digit makes numbers
    in the arithmetic and counting answers compositional instead of memorised merges.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return tokenizer


def build_tokenizer(out_dir: str | Path) -> Path:
    """Train and write the tokenizer in transformers' format to ``out_dir``; return ``out_dir``."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    backend = build_backend_tokenizer()
    if backend.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"the corpus yields {backend.get_vocab_size()} tokens, not {VOCAB_SIZE}: add more text"
        )
    markers = [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=markers,
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from vlmtrain.assets import TOKENIZER_DIR

    out_dir = Path(argv[0]) if argv else TOKENIZER_DIR
    build_tokenizer(out_dir)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
