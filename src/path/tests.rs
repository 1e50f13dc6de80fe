use super::*;

fn canon(raw: &str) -> Result<String, BadPath> {
    canonical(raw.as_bytes()).map(Cow::into_owned)
}

#[test]
fn spellings_of_one_path_have_one_canonical_form() {
    for raw in [
        "/jobs/X/complete",
        "//jobs/X/complete",
        "/jobs/X/complete/",
        "/jobs/X/complete//",
        "/jobs/X/complet%65",
        "/jobs/X/complet%65?x=%zz",
        "/j%6Fbs/X/complete",
        "/j%6fbs/X/complete",
        "/jobs/./X/complete",
        "/jobs/X/./complete/.",
        "/jobs/Y/../X/complete",
        "/../jobs/X/complete",
        "/jobs/X/complete;v=1",
        "/jobs;a=1/X;b=%zz/complete;",
        "/jobs/X/complete?x=1",
        "/jobs/X/complete#frag",
        "/jobs//X/complete",
        "/jobs/%2E/X/%2e%2E/X/complete",
        "/jobs/X/y/..;/complete",
    ] {
        assert_eq!(canon(raw).as_deref(), Ok("/jobs/X/complete"), "{raw}");
    }
}

#[test]
fn other_paths_stay_apart() {
    assert_eq!(
        canon("/jobs/X/completed").as_deref(),
        Ok("/jobs/X/completed")
    );
    assert_eq!(canon("/Jobs/X/complete").as_deref(), Ok("/Jobs/X/complete"));
    // Reserved characters stay encoded, with uppercase hex; decoded, they would mean something else.
    assert_eq!(canon("/a%3bb/%c3%a9").as_deref(), Ok("/a%3Bb/%C3%A9"));
    assert_eq!(canon("/a%7E%41").as_deref(), Ok("/a~A"));
    assert_eq!(canon("/").as_deref(), Ok("/"));
    assert_eq!(canon("//").as_deref(), Ok("/"));
    assert_eq!(canon("/..").as_deref(), Ok("/"));
    assert_eq!(canon("/?q").as_deref(), Ok("/"));
    assert_eq!(canon("*").as_deref(), Ok("*"));
    assert_eq!(canon("/.well-known/x").as_deref(), Ok("/.well-known/x"));
    assert_eq!(canon("/...").as_deref(), Ok("/..."));
}

#[test]
fn bad_paths_say_why() {
    assert_eq!(canonical(b"/jobs/X\xff/complete"), Err(BadPath::NotUtf8));
    assert_eq!(canon("/jobs/%zz/complete"), Err(BadPath::BadEscape));
    assert_eq!(canon("/jobs/%4"), Err(BadPath::BadEscape));
    assert_eq!(canon("/jobs/%"), Err(BadPath::BadEscape));
    assert_eq!(canon("/jobs/a%2Fb/complete"), Err(BadPath::EscapedSlash));
    assert_eq!(canon("/jobs/a%2fb/complete"), Err(BadPath::EscapedSlash));
    assert_eq!(canon("/jobs/a%5cb/complete"), Err(BadPath::EscapedSlash));
    // The query's bytes and a path parameter's escapes do not matter.
    assert_eq!(
        canonical(b"/jobs/X/complete?\xff%zz").map(Cow::into_owned),
        Ok("/jobs/X/complete".to_string())
    );
    assert_eq!(
        canon("/jobs/X;p=%2F/complete").as_deref(),
        Ok("/jobs/X/complete")
    );
    assert_eq!(BadPath::EscapedSlash.reason(), "escaped_slash");
}

#[test]
fn a_canonical_path_is_borrowed() {
    for raw in [
        "/jobs/X/complete",
        "/jobs/X/complete?a=//./;%",
        "/",
        "/a.b/c..d",
        "*",
    ] {
        assert!(
            matches!(canonical(raw.as_bytes()), Ok(Cow::Borrowed(_))),
            "{raw}"
        );
    }
    for raw in ["//a", "/a/", "/a/./b", "/a%41", "/a;b", "/.x"] {
        assert!(
            matches!(canonical(raw.as_bytes()), Ok(Cow::Owned(_))),
            "{raw}"
        );
    }
}

// Native only: proptest is a native dev-dependency.
#[cfg(not(target_arch = "wasm32"))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A canonical segment: unreserved characters, some other characters, uppercase escapes of
    /// reserved ones; never `.` or `..`.
    fn segment() -> impl Strategy<Value = String> {
        "([A-Za-z0-9._~!$&'()*+,=:@-]|%3B|%3F|%C3%A9|é){1,6}"
            .prop_filter("not a dot segment", |s| s != "." && s != "..")
    }

    /// One of the many spellings of a canonical segment: unreserved characters percent-encoded
    /// at random, with hex digits in either case.
    fn spell(segment: &str, choices: &[u8]) -> String {
        let mut out = String::new();
        let mut rest = segment;
        let mut i = 0;
        while let Some(c) = rest.chars().next() {
            let choice = choices[i % choices.len()];
            i += 1;
            if c == '%' {
                // An escape that stays: its hex may be lowercase.
                let hex = &rest[1..3];
                out.push('%');
                out.push_str(&if choice % 2 == 0 {
                    hex.to_lowercase()
                } else {
                    hex.to_string()
                });
                rest = &rest[3..];
                continue;
            }
            if c.is_ascii() && is_unreserved(c as u8) && choice % 3 == 0 {
                let hex = format!("{:02X}", c as u8);
                out.push('%');
                out.push_str(&if choice % 2 == 0 {
                    hex.to_lowercase()
                } else {
                    hex
                });
            } else {
                out.push(c);
            }
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    proptest! {
        /// Every spelling of a canonical path canonicalises to it: escapes, merged and trailing
        /// slashes, dot segments, path parameters, a query or fragment.
        #[test]
        fn spellings_canonicalise_to_the_path(
            segments in prop::collection::vec(segment(), 0..5),
            choices in prop::collection::vec(any::<u8>(), 8..32),
            tail in prop::option::of("[?#]\\PC{0,8}"),
        ) {
            let path = if segments.is_empty() { "/".to_string() } else {
                segments.iter().map(|s| format!("/{s}")).collect::<String>()
            };
            let mut raw = String::new();
            for (i, s) in segments.iter().enumerate() {
                let c = choices[i % choices.len()];
                raw.push_str(["/", "//", "/./", "/x/../", "/%2e/"][usize::from(c % 5)]);
                raw.push_str(&spell(s, &choices[i..]));
                if c % 7 == 0 {
                    raw.push_str(";p=1");
                }
            }
            if choices[0] % 2 == 0 || raw.is_empty() {
                raw.push('/');
            }
            raw.push_str(tail.as_deref().unwrap_or(""));
            prop_assert_eq!(canon(&raw), Ok(path.clone()), "{}", raw);
            // Canonical is a fixed point, borrowed unless it holds an escape.
            match canonical(path.as_bytes()) {
                Ok(Cow::Borrowed(p)) => prop_assert!(p == path && !p.contains('%')),
                Ok(Cow::Owned(p)) => prop_assert!(p == path && p.contains('%')),
                Err(e) => prop_assert!(false, "{:?}", e),
            }
        }

        /// Whatever the bytes, canonicalising never panics, and its result is canonical.
        #[test]
        fn any_bytes_canonicalise_to_a_fixed_point(raw in prop::collection::vec(any::<u8>(), 0..24)) {
            let mut bytes = vec![b'/'];
            bytes.extend(raw.iter().map(|b| if b % 4 == 0 { b'/' } else if b % 5 == 0 { b'.' } else { *b }));
            if let Ok(c) = canonical(&bytes) {
                let again = canonical(c.as_bytes()).map(Cow::into_owned);
                prop_assert_eq!(again, Ok(c.clone().into_owned()));
            }
        }
    }
}
