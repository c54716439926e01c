"""
A synthetic conversation skill for trying supervised fine-tuning end to end (docs/chat.md):
"reverse <word>" -> the word reversed, for random lowercase words of 3 or 4 letters. Writes
--out (train conversations, in the OpenAI/HF `messages` layout) and --held_out (words never
in --out, for measuring exact-match replies).

    python data/chat/synthetic.py --out=data/reverse.jsonl --held_out=data/reverse_held_out.json
"""
import argparse
import json
import random


def reverse_conversation(word):
    return {"messages": [{"role": "user", "content": f"reverse {word}"},
                         {"role": "assistant", "content": word[::-1]}]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--held_out", default=None)
    p.add_argument("--count", type=int, default=4000, help="train conversations")
    p.add_argument("--held_out_count", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    words = set()
    while len(words) < args.count + args.held_out_count:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 4))))
    words = sorted(words)
    rng.shuffle(words)
    held, train = words[:args.held_out_count], words[args.held_out_count:]
    with open(args.out, "w") as f:
        for w in train:
            f.write(json.dumps(reverse_conversation(w)) + "\n")
    if args.held_out:
        with open(args.held_out, "w") as f:
            json.dump(held, f)
    print(f"wrote {len(train)} conversations to {args.out}"
          + (f", {len(held)} held-out words to {args.held_out}" if args.held_out else ""))


if __name__ == "__main__":
    main()
