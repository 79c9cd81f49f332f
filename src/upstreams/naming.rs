//! How §5 error messages name the upstreams an error is about.
//!
//! With the default single upstream (`UPSTREAMS` unset: one `openai` upstream from the §7
//! settings) the messages say "OpenAI" and point to status.openai.com, as they always did. With a
//! configured list they name the upstreams that failed, by name and kind (never a URL, key or
//! query string), and point to status.openai.com only when one of them is an `openai`-kind
//! upstream at OpenAI itself (`api.openai.com` or a regional `*.api.openai.com`): an Azure
//! resource or another OpenAI-compatible service has its own status page.

use reqwest::Url;

use super::{UpstreamKind, UpstreamSpec};
use crate::config::DEFAULT_UPSTREAM;

/// The upstreams an error is about, as a message names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naming {
    /// "OpenAI", "the upstream `primary` (openai)", "the upstreams `a` (openai) and `b` (azure)".
    pub phrase: String,
    pub plural: bool,
    /// Whether the message should point to status.openai.com.
    pub status_page: bool,
    /// The default single upstream ("OpenAI"): messages keep their v1 wording.
    pub default: bool,
}

impl Naming {
    /// The default single upstream: "OpenAI", with its status page.
    pub fn openai() -> Naming {
        Naming {
            phrase: "OpenAI".into(),
            plural: false,
            status_page: true,
            default: true,
        }
    }

    /// The phrase at the start of a sentence.
    pub fn subject(&self) -> String {
        capitalized(&self.phrase)
    }

    /// "OpenAI's `noun`", or "the `noun` from the upstream `x` (openai)".
    pub fn possessive(&self, noun: &str) -> String {
        match self.default {
            true => format!("{}'s {noun}", self.phrase),
            false => format!("the {noun} from {}", self.phrase),
        }
    }

    /// `singular` or `plural` to agree with the phrase ("is" / "are").
    pub fn verb<'a>(&self, singular: &'a str, plural: &'a str) -> &'a str {
        if self.plural { plural } else { singular }
    }
}

/// `s` with its first letter upper-cased, for the start of a sentence.
pub fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

/// Whether `list` is the default single upstream built from the §7 settings.
pub fn is_default(list: &[UpstreamSpec]) -> bool {
    matches!(list, [only] if only.name == DEFAULT_UPSTREAM && only.kind == UpstreamKind::OpenAi)
}

/// Names the upstreams at positions `which` of `list` (out-of-range and repeated positions are
/// ignored; list order is kept).
pub fn naming(list: &[UpstreamSpec], which: &[usize]) -> Naming {
    if is_default(list) {
        return Naming::openai();
    }
    let named: Vec<&UpstreamSpec> = list
        .iter()
        .enumerate()
        .filter(|(i, _)| which.contains(i))
        .map(|(_, u)| u)
        .collect();
    let labels: Vec<String> = named
        .iter()
        .map(|u| format!("`{}` ({})", u.name, kind_label(u.kind)))
        .collect();
    let phrase = match labels.as_slice() {
        [] => "the upstreams".to_owned(),
        [one] => format!("the upstream {one}"),
        [init @ .., last] => format!("the upstreams {} and {last}", init.join(", ")),
    };
    Naming {
        phrase,
        plural: labels.len() != 1,
        status_page: named.iter().any(|u| is_openai_itself(u)),
        default: false,
    }
}

fn kind_label(kind: UpstreamKind) -> &'static str {
    match kind {
        UpstreamKind::OpenAi => "openai",
        UpstreamKind::Azure => "azure",
    }
}

/// An `openai`-kind upstream at `api.openai.com` or a regional `*.api.openai.com`.
fn is_openai_itself(u: &UpstreamSpec) -> bool {
    let host = Url::parse(&u.base_url).ok().and_then(|url| {
        url.host_str()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
    });
    u.kind == UpstreamKind::OpenAi
        && host.is_some_and(|h| h == "api.openai.com" || h.ends_with(".api.openai.com"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySource;

    fn spec(name: &str, kind: UpstreamKind, base_url: &str) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            base_url: base_url.into(),
            kind,
            key: KeySource::Env("sk-never-shown".into()),
            organization: None,
            project: None,
            models: Default::default(),
        }
    }

    fn list() -> Vec<UpstreamSpec> {
        vec![
            spec(
                "primary",
                UpstreamKind::OpenAi,
                "https://us.api.openai.com/v1",
            ),
            spec(
                "azure-eu",
                UpstreamKind::Azure,
                "https://res.openai.azure.com/openai/v1",
            ),
            spec("local", UpstreamKind::OpenAi, "http://127.0.0.1:8080/v1"),
        ]
    }

    #[test]
    fn the_default_upstream_is_openai_with_its_status_page() {
        // Whatever OPENAI_BASE_URL points at, the single default upstream keeps v1's wording.
        for url in ["https://api.openai.com/v1", "http://127.0.0.1:9/v1"] {
            let default = [spec(DEFAULT_UPSTREAM, UpstreamKind::OpenAi, url)];
            for which in [&[][..], &[0]] {
                let n = naming(&default, which);
                assert_eq!(
                    (n.subject(), n.plural, n.status_page),
                    ("OpenAI".into(), false, true)
                );
                assert_eq!(n.verb("is", "are"), "is");
                assert_eq!(n.possessive("stream"), "OpenAI's stream");
            }
        }
    }

    #[test]
    fn a_configured_list_names_the_failed_upstreams_by_name_and_kind() {
        let l = list();
        let one = naming(&l, &[1]);
        assert_eq!(one.phrase, "the upstream `azure-eu` (azure)");
        assert_eq!(one.subject(), "The upstream `azure-eu` (azure)");
        assert_eq!(one.verb("is", "are"), "is");
        assert_eq!(
            one.possessive("stream"),
            "the stream from the upstream `azure-eu` (azure)"
        );
        let two = naming(&l, &[2, 1, 2]);
        assert_eq!(
            two.phrase,
            "the upstreams `azure-eu` (azure) and `local` (openai)"
        );
        assert_eq!(two.verb("is", "are"), "are");
        let three = naming(&l, &[0, 1, 2, 7]);
        assert_eq!(
            three.phrase,
            "the upstreams `primary` (openai), `azure-eu` (azure) and `local` (openai)"
        );
        let none = naming(&l, &[]);
        assert_eq!(
            (none.subject().as_str(), none.plural),
            ("The upstreams", true)
        );
        // Never a URL or a key.
        for n in [one, two, three] {
            assert!(
                !n.phrase.contains("http") && !n.phrase.contains("sk-"),
                "{n:?}"
            );
        }
    }

    #[test]
    fn status_openai_com_only_when_openai_itself_failed() {
        let l = list();
        assert!(naming(&l, &[0]).status_page, "regional api.openai.com");
        assert!(naming(&l, &[0, 1]).status_page);
        assert!(
            !naming(&l, &[1]).status_page,
            "Azure has its own status page"
        );
        assert!(!naming(&l, &[1, 2]).status_page);
        let lookalikes = [
            spec(
                "a",
                UpstreamKind::OpenAi,
                "https://api.openai.com.evil.example/v1",
            ),
            spec("b", UpstreamKind::OpenAi, "https://notapi.openai.com/v1"),
            spec("c", UpstreamKind::Azure, "https://api.openai.com/v1"),
        ];
        assert!(!naming(&lookalikes, &[0, 1, 2]).status_page);
        let at_openai = [spec(
            "x",
            UpstreamKind::OpenAi,
            "https://API.OpenAI.com./v1",
        )];
        assert!(naming(&at_openai, &[0]).status_page);
    }

    #[test]
    fn a_list_of_one_upstream_named_otherwise_is_named() {
        let one = [spec(
            "gateway",
            UpstreamKind::OpenAi,
            "https://api.openai.com/v1",
        )];
        let n = naming(&one, &[0]);
        assert_eq!(n.subject(), "The upstream `gateway` (openai)");
        assert!(n.status_page);
        let azure_named_openai = [spec(
            DEFAULT_UPSTREAM,
            UpstreamKind::Azure,
            "https://r.openai.azure.com/openai/v1",
        )];
        assert!(!is_default(&azure_named_openai));
        assert_eq!(
            naming(&azure_named_openai, &[0]).subject(),
            "The upstream `openai` (azure)"
        );
    }
}
