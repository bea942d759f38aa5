//! Turning an LLM answer into usable caption lines.
//!
//! Instruction-tuned models wrap their lists in chatter: a "Here are 25 captions:" preamble,
//! numbering, quotes, markdown bullets and bold headings, a closing "Note: ..." line. This file
//! keeps only the captions themselves, lowercased, in the order the model wrote them. The rules
//! follow the SynCD reference (split lines, strip numbering, leading dots and quotes, lowercase,
//! drop meta lines, de-duplicate) with two deliberate differences: duplicates are removed keeping
//! the first occurrence (the reference goes through a set and loses the order, so its output is
//! not reproducible), and only the list numbering is stripped, not every digit of the line (the
//! reference also mangles "2 apples" into " apples").
//!
//! Nothing here can fail: any text, however malformed, yields a (possibly empty) list of lines.

use super::requests::RequestKind;
use std::collections::HashSet;

/// Words that mark a line as the model talking about its answer rather than giving a caption.
/// Matched as substrings of the lowercased line, as the reference does.
const META_MARKERS: &[&str] = &[
    "**",
    "note:",
    "suggestions",
    "captions",
    "here are",
    "here is",
    "here's",
    "brief description",
    "detailed visual",
    "meet your requirements",
    "i hope",
    "let me know",
    "i've tried",
    "i have tried",
    "as requested",
    "i'm sorry",
    "i apologize",
    "i cannot",
    "i can't",
];

/// Lines shorter than this many words are headings or chatter ("sure!", "styles:"), never a
/// caption of a scene or an animal.
const MIN_WORDS: usize = 3;

/// Subjective adjectives (and their adverbs) scrubbed from rigid captions. The reference asks the
/// model to avoid emotional words and scrubs what slips through: they say nothing about what the
/// image shows, and FLUX tends to answer them with an over-styled "beauty shot".
pub const SUBJECTIVE_WORDS: &[&str] = &[
    "amazing",
    "amazingly",
    "astonishing",
    "awe-inspiring",
    "awesome",
    "beautiful",
    "beautifully",
    "breathtaking",
    "captivating",
    "charming",
    "cute",
    "dazzling",
    "delightful",
    "elegant",
    "elegantly",
    "enchanting",
    "exquisite",
    "fabulous",
    "fantastic",
    "gorgeous",
    "graceful",
    "impressive",
    "incredible",
    "lovely",
    "magical",
    "magnificent",
    "majestic",
    "marvelous",
    "marvellous",
    "mesmerizing",
    "nice",
    "perfect",
    "perfectly",
    "picturesque",
    "pretty",
    "remarkable",
    "serene",
    "spectacular",
    "splendid",
    "striking",
    "stunning",
    "stylish",
    "superb",
    "wonderful",
];

/// Cleans a raw answer into caption lines: numbering, bullets, leading dots and quotes stripped,
/// lowercased, whitespace collapsed, meta lines and empty lines dropped. Keeps duplicates and
/// order; see [`UniqueLines`] for de-duplication.
pub fn clean_lines(answer: &str) -> Vec<String> {
    answer.lines().filter_map(clean_line).collect()
}

/// Cleans one line, or returns `None` when nothing usable is left.
fn clean_line(line: &str) -> Option<String> {
    let lowered = line.to_lowercase();
    if META_MARKERS.iter().any(|marker| lowered.contains(marker)) {
        return None;
    }
    let unquoted: String = lowered
        .chars()
        .filter(|c| !matches!(c, '"' | '\u{201c}' | '\u{201d}'))
        .collect();
    let stripped = strip_list_marker(&unquoted);
    let collapsed = stripped.split_whitespace().collect::<Vec<_>>().join(" ");
    // A line ending in a colon introduces a group of captions ("different styles:").
    if collapsed.ends_with(':') || collapsed.split(' ').count() < MIN_WORDS {
        return None;
    }
    Some(collapsed)
}

/// Strips what a list puts before an item: bullets ("-", "*", "•", "#", ">"), a number followed by
/// ".", ")" or ":" (optionally in parentheses), then any leading dots, in any combination.
fn strip_list_marker(line: &str) -> &str {
    let mut rest = line.trim_start();
    loop {
        let before = rest;
        rest = rest.trim_start_matches(['-', '*', '\u{2022}', '#', '>', '.']);
        rest = strip_enumeration(rest).trim_start();
        if rest.len() == before.len() {
            return rest;
        }
    }
}

/// Strips "12. " / "12)" / "12: " / "(12)" at the start of `text`. A number that begins the
/// caption itself ("2 cats on a sofa", "1.5 litres of water") is kept.
fn strip_enumeration(text: &str) -> &str {
    let inner = text.strip_prefix('(').unwrap_or(text);
    let digits = inner.len() - inner.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return text;
    }
    let after = &inner[digits..];
    let ends_item_number = |rest: &str| rest.chars().next().is_none_or(char::is_whitespace);
    match after.chars().next() {
        Some(')') => &after[1..],
        Some('.' | ':') if ends_item_number(&after[1..]) => &after[1..],
        _ => text,
    }
}

/// The usable lines of one answer for a request of `kind` about `subject`: cleaned; for
/// deformable backgrounds only the lines naming the category; for rigid backgrounds scrubbed of
/// subjective words.
pub fn usable_lines(kind: RequestKind, subject: &str, answer: &str) -> Vec<String> {
    let lines = clean_lines(answer);
    match kind {
        RequestKind::RigidBackgrounds => lines
            .iter()
            .map(|line| scrub_subjective(line))
            .filter(|line| line.split(' ').count() >= MIN_WORDS)
            .collect(),
        RequestKind::DeformableBackgrounds => lines
            .into_iter()
            .filter(|line| mentions_word(line, subject))
            .collect(),
        RequestKind::DeformableDescriptions => lines,
    }
}

/// Whether `line` names `word` (case-insensitive) as a whole word or phrase, plural "s"/"es"
/// allowed: "fox" matches "two foxes" but "cat" does not match "a catalog". The generation stage
/// looks the word up in the prompt to find the subject's attention, so a substring is not enough.
pub fn mentions_word(line: &str, word: &str) -> bool {
    let line = line.to_lowercase();
    let word = word.trim().to_lowercase();
    if word.is_empty() {
        return false;
    }
    let is_word_char = |c: char| c.is_alphanumeric();
    line.match_indices(&word).any(|(start, _)| {
        let starts_word = !line[..start].chars().next_back().is_some_and(is_word_char);
        let tail = &line[start + word.len()..];
        let tail = tail
            .strip_prefix("es")
            .or_else(|| tail.strip_prefix('s'))
            .filter(|rest| !rest.chars().next().is_some_and(is_word_char))
            .unwrap_or(tail);
        starts_word && !tail.chars().next().is_some_and(is_word_char)
    })
}

/// Removes [`SUBJECTIVE_WORDS`] from a caption, repairing what the removal breaks: an "and"/"or"
/// left dangling after a removed word, a comma left before a removed word, sentence punctuation
/// carried by a removed word, and the article ("an elegant vase" becomes "a vase").
pub fn scrub_subjective(line: &str) -> String {
    let mut kept: Vec<String> = Vec::new();
    let mut previous_removed = false;
    let mut fix_article_of_next = false;
    for token in line.split_whitespace() {
        let bare = token.trim_end_matches([',', '.', ';', '!', '?']);
        let bare_lower = bare.to_lowercase();
        if SUBJECTIVE_WORDS.contains(&bare_lower.as_str()) {
            let carried = &token[bare.len()..];
            if let Some(last) = kept.last_mut() {
                if carried.is_empty() && last.ends_with(',') {
                    last.pop();
                } else if carried.contains(['.', '!', '?', ';']) {
                    last.push_str(carried.trim_start_matches(','));
                }
                fix_article_of_next = is_indefinite_article(last);
            }
            previous_removed = true;
            continue;
        }
        if previous_removed && matches!(bare_lower.as_str(), "and" | "or") && bare == token {
            continue;
        }
        if fix_article_of_next {
            if let Some(last) = kept.last_mut() {
                *last = matching_article(last, token);
            }
            fix_article_of_next = false;
        }
        previous_removed = false;
        kept.push(token.to_string());
    }
    kept.join(" ")
}

fn is_indefinite_article(word: &str) -> bool {
    matches!(word.to_lowercase().as_str(), "a" | "an")
}

/// The indefinite article ("a" or "an") for `next_word`, keeping the capitalisation of
/// `current_article`. A spelling rule of thumb (vowel letter), good enough for captions.
fn matching_article(current_article: &str, next_word: &str) -> String {
    let article = indefinite_article(next_word);
    if current_article.starts_with(char::is_uppercase) {
        let mut chars = article.chars();
        chars
            .next()
            .map(|first| first.to_uppercase().chain(chars).collect())
            .unwrap_or_default()
    } else {
        article.to_string()
    }
}

/// "a" or "an" before `word`, by its first letter.
pub fn indefinite_article(word: &str) -> &'static str {
    match word.trim().chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

/// Lines in first-seen order without repeats.
#[derive(Debug, Default)]
pub struct UniqueLines {
    seen: HashSet<String>,
    lines: Vec<String>,
}

impl UniqueLines {
    /// Adds the lines not seen yet, in order; returns how many were new.
    pub fn extend(&mut self, lines: impl IntoIterator<Item = String>) -> usize {
        let before = self.lines.len();
        for line in lines {
            if self.seen.insert(line.clone()) {
                self.lines.push(line);
            }
        }
        self.lines.len() - before
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn into_vec(self) -> Vec<String> {
        self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_ANSWER: &str = "Here are 5 captions for images of a fox:\n\n\
        1. \"A red fox sitting on a snowy hillside with pine trees in the background.\"\n\
        2. A fox standing next to a wooden fence in a farm field.\n\
        3.   \u{201c}A fox drinking from a stream in a forest.\u{201d}\n\
        **Different styles:**\n\
        4) A watercolor painting of a fox in a meadow.\n\
        - A fox curled up beside 2 pumpkins on a porch.\n\
        \n\
        Note: I've kept the captions factual and terse, as requested.";

    #[test]
    fn strips_numbering_quotes_bullets_and_meta_lines() {
        assert_eq!(
            clean_lines(LLAMA_ANSWER),
            vec![
                "a red fox sitting on a snowy hillside with pine trees in the background.",
                "a fox standing next to a wooden fence in a farm field.",
                "a fox drinking from a stream in a forest.",
                "a watercolor painting of a fox in a meadow.",
                "a fox curled up beside 2 pumpkins on a porch.",
            ]
        );
    }

    #[test]
    fn strips_markers_in_any_combination() {
        assert_eq!(strip_list_marker("  - 12. ..a fox"), "a fox");
        assert_eq!(strip_list_marker("(3) a fox"), "a fox");
        assert_eq!(strip_list_marker("* 7: a fox"), "a fox");
        assert_eq!(strip_list_marker("\u{2022} a fox"), "a fox");
        // A number that starts the caption itself stays.
        assert_eq!(strip_list_marker("2 foxes in a den"), "2 foxes in a den");
        assert_eq!(
            strip_list_marker("1.5 litres of water"),
            "1.5 litres of water"
        );
        assert_eq!(strip_list_marker("3."), "");
    }

    #[test]
    fn garbage_gives_no_lines_and_never_panics() {
        for garbage in [
            "",
            "\n\n\n",
            "{\"choices\": null}",
            "1.\n2.\n3.",
            "Sure!",
            "\u{fffd}\u{fffd}\u{fffd}",
            "((((((((",
            "Here are 10 captions:",
            "Captions:\n**Backgrounds:**",
        ] {
            assert!(clean_lines(garbage).is_empty(), "{garbage:?}");
        }
    }

    #[test]
    fn short_lines_and_headings_are_dropped() {
        assert!(clean_lines("Sure thing!\nDifferent backgrounds and scenes:").is_empty());
    }

    #[test]
    fn deformable_backgrounds_must_name_the_category() {
        let answer = "1. A Fox in the snow.\n2. A dog chasing a ball in a park.\n\
                      3. Two FOXES playing near a log.\n4. A foxglove flower in a garden bed.";
        assert_eq!(
            usable_lines(RequestKind::DeformableBackgrounds, "Fox", answer),
            vec!["a fox in the snow.", "two foxes playing near a log."]
        );
    }

    #[test]
    fn descriptions_are_not_filtered_by_category() {
        let answer = "1. Its fur is bright orange with a white chest and black legs.";
        assert_eq!(
            usable_lines(RequestKind::DeformableDescriptions, "fox", answer).len(),
            1
        );
    }

    #[test]
    fn word_matching_is_whole_word_and_case_insensitive() {
        assert!(mentions_word("a cat on a mat", "Cat"));
        assert!(mentions_word("three cats.", "cat"));
        assert!(mentions_word("the cat's tail", "cat"));
        assert!(!mentions_word("a catalog on a desk", "cat"));
        assert!(!mentions_word("a bobcat in the snow", "cat"));
        assert!(mentions_word("a guinea pig eating hay", "guinea pig"));
        assert!(!mentions_word("anything", "  "));
    }

    #[test]
    fn rigid_captions_lose_subjective_words() {
        assert_eq!(
            scrub_subjective("a beautiful wooden chair in a stunning garden."),
            "a wooden chair in a garden."
        );
        assert_eq!(
            scrub_subjective("an elegant vase on a table"),
            "a vase on a table"
        );
        assert_eq!(
            scrub_subjective("a beautiful and elegant vase next to an apple"),
            "a vase next to an apple"
        );
        assert_eq!(
            scrub_subjective("a bright, gorgeous kitchen with a lovely, old oven"),
            "a bright kitchen with an old oven"
        );
        assert_eq!(
            scrub_subjective("a lamp in a room that looks stunning."),
            "a lamp in a room that looks."
        );
        assert_eq!(
            scrub_subjective("A gorgeous apple on a plate"),
            "An apple on a plate"
        );
        assert_eq!(scrub_subjective("a red mug"), "a red mug");
    }

    #[test]
    fn rigid_lines_emptied_by_the_scrub_are_dropped() {
        let answer = "1. A chair, beautiful and elegant.\n2. A chair on a wooden porch.";
        assert_eq!(
            usable_lines(RequestKind::RigidBackgrounds, "a chair", answer),
            vec!["a chair on a wooden porch."]
        );
    }

    #[test]
    fn unique_lines_keep_first_seen_order() {
        let mut lines = UniqueLines::default();
        assert_eq!(lines.extend(["b", "a", "b"].map(String::from)), 2);
        assert_eq!(lines.extend(["c", "a"].map(String::from)), 1);
        assert_eq!(lines.into_vec(), vec!["b", "a", "c"]);
    }

    #[test]
    fn articles_follow_the_next_word() {
        assert_eq!(indefinite_article("alpaca"), "an");
        assert_eq!(indefinite_article("Fox"), "a");
        assert_eq!(matching_article("A", "owl"), "An");
    }

    /// A brief fuzz of what an LLM may send back: random mixes of list markers, numbers,
    /// quotes, meta lines, non-ASCII text and stray bytes never panic, and every line that
    /// survives is a caption (lowercase, unquoted, no list marker, at least three words).
    #[test]
    fn random_answers_never_panic_and_leave_only_captions() {
        use rand::{Rng, SeedableRng};
        const PIECES: [&str; 24] = [
            "1.",
            "12)",
            "(3)",
            "4:",
            "-",
            "*",
            "\u{2022}",
            "#",
            ">",
            "...",
            "\"",
            "\u{201c}",
            "\u{201d}",
            "a fox",
            "in the snow",
            "Here are captions:",
            "note:",
            "2 cats",
            "1.5",
            "\u{e9}t\u{e9} \u{c9}L\u{c8}VE",
            "\u{1f98a}",
            "\t",
            " ",
            "\r",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let mut answer = String::new();
            for _ in 0..rng.random_range(0..40) {
                if rng.random_bool(0.15) {
                    answer.push('\n');
                } else if rng.random_bool(0.05) {
                    answer.push(char::from_u32(rng.random_range(0..0x3000)).unwrap_or('?'));
                } else {
                    answer.push_str(PIECES[rng.random_range(0..PIECES.len())]);
                    answer.push(' ');
                }
            }
            for line in clean_lines(&answer) {
                assert!(
                    line.split(' ').count() >= MIN_WORDS,
                    "{line:?} from {answer:?}"
                );
                assert!(!line.contains('"'), "{line:?}");
                assert_eq!(line, line.to_lowercase());
                assert_eq!(
                    strip_list_marker(&line),
                    line,
                    "a marker survived: {line:?}"
                );
            }
            let _ = usable_lines(RequestKind::RigidBackgrounds, "lamp", &answer);
            let _ = usable_lines(RequestKind::DeformableBackgrounds, "fox", &answer);
        }
    }
}
