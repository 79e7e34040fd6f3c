//! Text helpers for identity data: diacritics, login-safe slugs and family-name prefixes.
//!
//! These are pure functions of their input (no locale, no clock), so the extension can expose
//! them as `IMMUTABLE` SQL functions and use them in mappings and indexes.

use deunicode::deunicode_char;
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// Replaces letters with diacritics and other non-ASCII letters by plain ASCII letters.
///
/// How it works, so the result can be predicted:
///
/// 1. The input is composed (NFC) first, so `e` + U+0301 and the precomposed `é` give the same
///    result, and Hangul syllables stay whole.
/// 2. A letter whose canonical decomposition (NFD) is an ASCII letter plus combining marks keeps
///    the letter and drops the marks: `Zoë Ångström-Çelik` → `Zoe Angstrom-Celik`, `İ` → `I`.
/// 3. Any other non-ASCII letter or digit is transliterated with the `deunicode` tables, which
///    covers Latin letters that do not decompose (`ß`→`ss`, `ø`→`o`, `Ø`→`O`, `ł`→`l`, `ı`→`i`,
///    `æ`→`ae`, `œ`→`oe`, `đ`→`d`, `þ`→`th`) and also other scripts (`Юлия` → `Iuliia`,
///    `北京` → `Bei Jing`). Non-Latin scripts are transliterated rather
///    than dropped because an empty login or sort key is worse than an approximate one.
///    An upper-case letter that becomes several letters is title-cased before a lower-case
///    letter (`Æsa` → `Aesa`, `Þór` → `Thor`) and kept upper-case otherwise (`ÆRØ` → `AERO`).
/// 4. Combining marks left on their own are dropped; punctuation, symbols and spaces are kept
///    as they are (`José – CEO` → `Jose – CEO`): this function only changes letters; [`slug`]
///    goes further.
pub fn normalize_diacritics(input: &str) -> String {
    let chars: Vec<char> = input.nfc().collect();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii() {
            out.push(c);
            i += 1;
            continue;
        }
        if is_combining_mark(c) {
            // A mark that NFC could not fold into its base letter (e.g. q + acute): drop it.
            i += 1;
            continue;
        }
        if let Some(base) = ascii_base(c) {
            out.push_str(&base);
            i += 1;
            continue;
        }
        if !c.is_alphanumeric() {
            out.push(c);
            i += 1;
            continue;
        }
        // Transliterate a run of letters, with the marks that belong to them (Indic vowel signs
        // are combining marks and carry sound, so they go to deunicode with their letter).
        let start = i;
        i += 1;
        while i < chars.len()
            && !chars[i].is_ascii()
            && ascii_base(chars[i]).is_none()
            && (chars[i].is_alphanumeric() || is_combining_mark(chars[i]))
        {
            i += 1;
        }
        let next_is_lower = chars.get(i).is_some_and(|n| n.is_lowercase());
        out.push_str(&transliterate_run(&chars[start..i], next_is_lower));
    }
    out
}

/// The ASCII letters of `c` once combining marks are removed, when that is all it is made of.
fn ascii_base(c: char) -> Option<String> {
    let mut base = String::new();
    for d in std::iter::once(c).nfd() {
        if is_combining_mark(d) {
            continue;
        }
        if !d.is_ascii_alphanumeric() {
            return None;
        }
        base.push(d);
    }
    if base.is_empty() {
        None
    } else {
        Some(base)
    }
}

/// Transliterates a run of non-Latin (or non-decomposing Latin) letters with deunicode.
fn transliterate_run(run: &[char], next_is_lower: bool) -> String {
    let mut out = String::new();
    for (k, &c) in run.iter().enumerate() {
        let Some(t) = deunicode_char(c) else {
            // deunicode has no entry (rare scripts): keeping the letter beats losing it.
            out.push(c);
            continue;
        };
        let next_lower = match run.get(k + 1) {
            Some(n) => n.is_lowercase(),
            None => next_is_lower,
        };
        if c.is_uppercase() && t.chars().count() > 1 && next_lower {
            let mut cs = t.chars();
            if let Some(first) = cs.next() {
                out.push(first.to_ascii_uppercase());
                out.push_str(&cs.as_str().to_ascii_lowercase());
            }
        } else {
            out.push_str(t);
        }
    }
    // deunicode separates syllables of CJK characters with a trailing space ("Bei Jing ").
    let trimmed_len = out.trim_end().len();
    out.truncate(trimmed_len);
    out
}

/// Makes a login-safe string: only `a`–`z`, `0`–`9`, `.`, `_` and `-`.
///
/// Exactly: diacritics are normalized as in [`normalize_diacritics`] and any remaining
/// non-ASCII character is transliterated (so `’` becomes `'`); the result is lower-cased;
/// `.`, `_` and `-` are kept as separators; every other character (spaces, apostrophes,
/// commas, `@`, symbols, …) is dropped without a trace (`Anne Marie O'Brien` →
/// `annemarieobrien`). A run of consecutive separators collapses to its first one (`a..b` →
/// `a.b`, `a-.b` → `a-b`), and separators at the start and end are removed. The result can be
/// empty when the input has no letters or digits.
pub fn slug(input: &str) -> String {
    let ascii = deunicode::deunicode(&normalize_diacritics(input));
    let mut out = String::with_capacity(ascii.len());
    let mut last_was_sep = true; // true at the start drops leading separators
    for c in ascii.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
            last_was_sep = false;
        } else if matches!(c, '.' | '_' | '-') && !last_was_sep {
            out.push(c);
            last_was_sep = true;
        }
    }
    while out.ends_with(['.', '_', '-']) {
        out.pop();
    }
    out
}

/// Family-name prefixes (tussenvoegsels, particles) recognised by [`name_variants`], compared
/// case-insensitively, as whole words at the start of the family name.
///
/// Dutch, German, French, Italian, Spanish and Portuguese particles. A prefix is only split off
/// when a core name remains after it, so a family name that *is* one of these words (`Le`,
/// `Da`) stays whole.
pub const FAMILY_NAME_PREFIXES: &[&str] = &[
    "van", "von", "de", "der", "den", "des", "het", "'t", "te", "ter", "ten", "in", "op", "la",
    "le", "les", "du", "di", "da", "do", "das", "dos", "del", "della", "dei", "degli", "zu", "zum",
    "zur", "vom", "auf",
];

/// Elided prefixes written joined to the name with an apostrophe (`d'Artagnan`, `l'Estrange`),
/// compared case-insensitively; both `'` and `’` are recognised.
pub const ELIDED_PREFIXES: &[&str] = &["d'", "l'", "dell'"];

/// The forms of a person's name that provisioning needs, from [`name_variants`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameVariants {
    /// The given name, trimmed; `None` when absent or blank.
    pub given: Option<String>,
    /// The family-name prefix as written (`van der`, `d'`), empty when there is none.
    pub prefix: String,
    /// The family name without its prefix (`Berg`), the part a list is sorted on.
    pub core: String,
    /// The family name as displayed: prefix and core (`van der Berg`, `d'Artagnan`).
    pub family: String,
    /// The full display name: given name and family name (`Jan van der Berg`).
    pub display: String,
    /// The sort key in Dutch telephone-book order: core, then given name, then prefix
    /// (`Berg, Jan van der`; without a given name `Berg, van der`; without prefix `Berg, Jan`).
    pub sort_key: String,
    /// [`slug`] of the family name with every separator removed (`vanderberg`, `dartagnan`).
    pub family_login: String,
    /// `given.family` login form: [`slug`] of the given name without separators, a dot, and
    /// `family_login` (`jan.vanderberg`); just `family_login` when there is no given name.
    pub login: String,
}

/// Splits a family name into prefix and core name and derives display, sort and login forms.
///
/// Leading words of `family` that are in [`FAMILY_NAME_PREFIXES`] (or a leading word starting
/// with one of [`ELIDED_PREFIXES`]) form the prefix, as long as a core name remains. Runs of
/// whitespace are collapsed to one space; the case of each word is kept as written.
///
/// ```
/// let v = identity_sync_core::text::name_variants(Some("Jan"), "van der Berg");
/// assert_eq!(v.prefix, "van der");
/// assert_eq!(v.core, "Berg");
/// assert_eq!(v.sort_key, "Berg, Jan van der");
/// assert_eq!(v.login, "jan.vanderberg");
/// ```
pub fn name_variants(given: Option<&str>, family: &str) -> NameVariants {
    let given = given
        .map(|g| g.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|g| !g.is_empty());
    let words: Vec<&str> = family.split_whitespace().collect();

    let mut prefix_words: Vec<String> = Vec::new();
    let mut core_words: Vec<String> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let lower = words[i].to_lowercase().replace('’', "'");
        let remaining_after = words.len() - i - 1;
        if remaining_after > 0 && FAMILY_NAME_PREFIXES.contains(&lower.as_str()) {
            prefix_words.push(words[i].to_string());
            i += 1;
            continue;
        }
        // An elided prefix is glued to its core ("d'Artagnan"): split inside the word.
        if let Some(p) = ELIDED_PREFIXES
            .iter()
            .find(|p| lower.starts_with(*p) && lower.len() > p.len())
        {
            let cut = words[i]
                .char_indices()
                .nth(p.chars().count())
                .map_or(words[i].len(), |(pos, _)| pos);
            prefix_words.push(words[i][..cut].to_string());
            core_words.push(words[i][cut..].to_string());
            i += 1;
        }
        break;
    }
    core_words.extend(words[i..].iter().map(|w| w.to_string()));

    let prefix = join_prefix(&prefix_words);
    let core = core_words.join(" ");
    let family_display = if prefix.is_empty() {
        core.clone()
    } else if prefix.ends_with(['\'', '’']) {
        format!("{prefix}{core}")
    } else {
        format!("{prefix} {core}")
    };
    let display = match &given {
        Some(g) if !family_display.is_empty() => format!("{g} {family_display}"),
        Some(g) => g.clone(),
        None => family_display.clone(),
    };
    let tail: Vec<&str> = [given.as_deref(), Some(prefix.as_str())]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect();
    let sort_key = if tail.is_empty() {
        core.clone()
    } else if core.is_empty() {
        tail.join(" ")
    } else {
        format!("{core}, {}", tail.join(" "))
    };
    let family_login = compact_slug(&family_display);
    let login = match given.as_deref().map(compact_slug) {
        Some(g) if !g.is_empty() && !family_login.is_empty() => format!("{g}.{family_login}"),
        Some(g) if !g.is_empty() => g,
        _ => family_login.clone(),
    };
    NameVariants {
        given,
        prefix,
        core,
        family: family_display,
        display,
        sort_key,
        family_login,
        login,
    }
}

/// Joins prefix words with spaces, except after an elided prefix, which ends in an apostrophe.
fn join_prefix(words: &[String]) -> String {
    let mut out = String::new();
    for w in words {
        if !out.is_empty() && !out.ends_with(['\'', '’']) {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// A slug with its separators removed too, for the compact `vanderberg` form.
fn compact_slug(s: &str) -> String {
    slug(s)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f(input) == expected` for every case.
    fn check(f: fn(&str) -> String, cases: &[(&str, &str)]) {
        for (input, expected) in cases {
            assert_eq!(f(input), *expected, "{input:?}");
        }
    }

    #[test]
    fn diacritics_from_the_brief() {
        check(
            normalize_diacritics,
            &[
                ("Zoë Ångström-Çelik", "Zoe Angstrom-Celik"),
                ("ß ø Ø ł Ł ı İ æ œ đ þ", "ss o O l L i I ae oe d th"),
                ("Đorđe Þór Æsa ÆRØ", "Dorde Thor Aesa AERO"),
            ],
        );
    }

    #[test]
    fn decomposed_input_equals_precomposed() {
        check(
            normalize_diacritics,
            &[("Zoe\u{308}", "Zoe"), ("q\u{301}", "q")],
        );
    }

    #[test]
    fn other_scripts_are_transliterated_and_punctuation_kept() {
        check(
            normalize_diacritics,
            &[
                ("Юлия", "Iuliia"),
                ("北京", "Bei Jing"),
                ("José – CEO", "Jose – CEO"),
                ("", ""),
                ("plain ascii 123", "plain ascii 123"),
            ],
        );
    }

    #[test]
    fn slug_rules() {
        check(
            slug,
            &[
                ("Zoë Ångström-Çelik", "zoeangstrom-celik"),
                ("Anne Marie O’Brien", "annemarieobrien"),
                ("..a..b__c--", "a.b_c"),
                ("a-.b", "a-b"),
                ("  Straße 12 @ x.org ", "strasse12x.org"),
                ("!!!", ""),
                ("İlkay Gündoğan", "ilkaygundogan"),
            ],
        );
    }

    #[test]
    fn slug_output_alphabet() {
        for s in [
            "Ævar Þór Ørn",
            "Σωκράτης",
            "a\u{0}b\tc\n",
            "😀 x",
            "...---___",
        ] {
            let out = slug(s);
            assert!(out
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c)));
            assert!(!out.starts_with(['.', '-', '_']) && !out.ends_with(['.', '-', '_']));
            assert!(!out.contains(".."));
        }
    }

    #[test]
    fn prefixes() {
        let v = name_variants(None, "van der Berg");
        assert_eq!((v.prefix.as_str(), v.core.as_str()), ("van der", "Berg"));
        assert_eq!(v.sort_key, "Berg, van der");
        assert_eq!(v.family, "van der Berg");
        assert_eq!(v.display, "van der Berg");
        assert_eq!(v.family_login, "vanderberg");
        assert_eq!(v.login, "vanderberg");

        let v = name_variants(Some("Juan"), "de la Cruz");
        assert_eq!((v.prefix.as_str(), v.core.as_str()), ("de la", "Cruz"));
        assert_eq!(v.sort_key, "Cruz, Juan de la");
        assert_eq!(v.display, "Juan de la Cruz");
        assert_eq!(v.login, "juan.delacruz");

        let v = name_variants(Some("Charles"), "d'Artagnan");
        assert_eq!((v.prefix.as_str(), v.core.as_str()), ("d'", "Artagnan"));
        assert_eq!(v.family, "d'Artagnan");
        assert_eq!(v.sort_key, "Artagnan, Charles d'");
        assert_eq!(v.login, "charles.dartagnan");

        let v = name_variants(Some("  Zoë "), "  Van   't  Hof ");
        assert_eq!(v.prefix, "Van 't");
        assert_eq!(v.family, "Van 't Hof");
        assert_eq!(v.login, "zoe.vanthof");
    }

    #[test]
    fn a_prefix_word_alone_is_the_family_name() {
        let v = name_variants(Some("Anh"), "Le");
        assert_eq!((v.prefix.as_str(), v.core.as_str()), ("", "Le"));
        assert_eq!(v.sort_key, "Le, Anh");
        let v = name_variants(None, "Berg");
        assert_eq!(v.sort_key, "Berg");
        let v = name_variants(Some(""), "");
        assert_eq!(v.login, "");
        assert_eq!(v.given, None);
        let v = name_variants(Some("Ann"), "");
        assert_eq!((v.display.as_str(), v.login.as_str()), ("Ann", "ann"));
    }
}
