//! Shell-style patterns over device ids: `*` matches any run of characters, `?` one
//! character, and every other character itself.

/// Returns whether `text` matches `pattern` as a whole.
///
/// Runs in O(pattern × text) time at worst: on a mismatch after a `*`, the match
/// resumes one character further past that `*` instead of trying every split.
pub fn matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // Position after the last `*` seen, and the text position it was tried from.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p + 1, t));
                p += 1;
            }
            Some('?') => {
                p += 1;
                t += 1;
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((after_star, tried_from)) => {
                    p = after_star;
                    t = tried_from + 1;
                    star = Some((after_star, tried_from + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn matches_wildcards() {
        let cases = [
            ("jetson-*", "jetson-07", true),
            ("jetson-*", "jetson-", true),
            ("jetson-*", "pi-07", false),
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "a", false),
            ("cam-?", "cam-1", true),
            ("cam-?", "cam-12", false),
            ("cam-?", "cam-", false),
            ("*-07", "jetson-07", true),
            ("*-07", "jetson-071", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*a*a*a*", "aaa", true),
            ("*a*a*a*", "aa", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(matches(pattern, text), expected, "{pattern:?} vs {text:?}");
        }
    }
}
