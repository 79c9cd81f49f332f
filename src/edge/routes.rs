//! Which paths and methods exist (spec §2), in one table.

use http::Method;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Path below `/v1`, forwarded below `OPENAI_BASE_URL`; also the `route` log field.
    pub path: &'static str,
    pub method: Method,
    pub kind: RouteKind,
}

impl Route {
    /// Whether a `"stream": true` request on this route answers with SSE (spec §10).
    pub fn streams(&self) -> bool {
        matches!(
            self.path,
            "/chat/completions" | "/completions" | "/responses"
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// Answered by the function itself, without auth or upstream.
    Health,
    /// Forwarded; `model_required` says whether the JSON body must name a model.
    Forward { model_required: bool },
}

const fn forward(path: &'static str, model_required: bool) -> Route {
    Route {
        path,
        method: Method::POST,
        kind: RouteKind::Forward { model_required },
    }
}

/// Longest paths first so `/chat/completions` is not taken for `/completions`. A `static`: a
/// [`Method`] may own an allocation, so a `const` would not lend `&'static` routes.
pub static ROUTES: [Route; 7] = [
    forward("/chat/completions", true),
    forward("/completions", true),
    forward("/embeddings", true),
    forward("/responses", true),
    // OpenAI's moderations endpoint has a default model; requiring one would break valid calls.
    forward("/moderations", false),
    Route {
        path: "/models",
        method: Method::GET,
        kind: RouteKind::Forward {
            model_required: false,
        },
    },
    Route {
        path: "/health",
        method: Method::GET,
        kind: RouteKind::Health,
    },
];

/// Finds the route for a request path. Any stage or base-path prefix is ignored, and so is the
/// `/v1` prefix: `/prod/v1/chat/completions`, `/v1/chat/completions` and `/chat/completions`
/// all match. A trailing slash is tolerated. Routes start with `/`, so a match always begins at
/// a segment boundary.
pub fn find(path: &str) -> Option<&'static Route> {
    let path = path.split('?').next().unwrap_or("").trim_end_matches('/');
    ROUTES.iter().find(|r| path.ends_with(r.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_of(p: &str) -> Option<&'static str> {
        find(p).map(|r| r.path)
    }

    #[test]
    fn prefixes_are_ignored() {
        assert_eq!(path_of("/v1/chat/completions"), Some("/chat/completions"));
        assert_eq!(path_of("/chat/completions"), Some("/chat/completions"));
        assert_eq!(
            path_of("/prod/v1/chat/completions"),
            Some("/chat/completions")
        );
        assert_eq!(path_of("/v1/completions"), Some("/completions"));
        assert_eq!(path_of("/v1/embeddings/"), Some("/embeddings"));
        assert_eq!(path_of("/health"), Some("/health"));
        assert_eq!(path_of("/prod/health"), Some("/health"));
        assert_eq!(path_of("/v1/models"), Some("/models"));
    }

    #[test]
    fn unknown_paths_do_not_match() {
        for p in [
            "/",
            "",
            "/v1",
            "/v1/images/generations",
            "/v1/chat/completions/x",
            "/v1/models/gpt-4o",
            "/xhealth",
        ] {
            assert_eq!(path_of(p), None, "{p}");
        }
    }
}
