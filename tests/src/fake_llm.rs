//! A fake OpenAI-compatible chat-completions server for tests of the prompt stage.
//!
//! It listens on `127.0.0.1:0`, serves `POST /v1/chat/completions`, records every request and
//! answers from a script: first the replies queued with [`FakeLlm::push`], in order, then whatever
//! its responder returns. The default responder ([`FakeLlm::recorded`]) answers the way
//! Llama-3-8B-Instruct does — a "Here are N captions" preamble, numbering, quotes, a bold heading,
//! a closing "Note: ..." — with N lines about the subject named in the prompt, repeating part of
//! its previous answer as a sampling model does. Scripted replies cover what a real server does
//! on a bad day: error statuses, 429 with `Retry-After`, slow answers, bodies that are not chat
//! completions.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use syncd_worker::prompt::cleaning::indefinite_article;
use tokio::task::JoinHandle;

/// One answer of the fake server.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with a chat completion whose message is this text (`finish_reason` "stop").
    Answer(String),
    /// 200 with a chat completion cut at the token limit (`finish_reason` "length").
    Truncated(String),
    /// 200 with a chat completion whose message content is `null`.
    NullContent,
    /// This status with an OpenAI-style JSON error body.
    Status(u16),
    /// 429, with a `Retry-After` header in seconds when given.
    RateLimited { retry_after_secs: Option<u64> },
    /// 200 with exactly these bytes as a JSON body: garbage, a missing `choices`, non-UTF-8.
    Raw(Vec<u8>),
    /// Waits, then sends the inner reply (for timeouts).
    Delayed(Duration, Box<Reply>),
}

impl Reply {
    pub fn delayed(delay: Duration, reply: Reply) -> Self {
        Reply::Delayed(delay, Box::new(reply))
    }
}

/// What the fake server received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The JSON body (`Value::Null` when the body was not JSON).
    pub body: Value,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

impl RecordedRequest {
    /// The content of the first message with `role`.
    pub fn message(&self, role: &str) -> Option<&str> {
        self.body["messages"]
            .as_array()?
            .iter()
            .find(|message| message["role"] == role)?["content"]
            .as_str()
    }

    pub fn user_prompt(&self) -> Option<&str> {
        self.message("user")
    }
}

type Responder = dyn Fn(&RecordedRequest, usize) -> Reply + Send + Sync;

struct Shared {
    script: Mutex<VecDeque<Reply>>,
    responder: Box<Responder>,
    requests: Mutex<Vec<RecordedRequest>>,
    count: AtomicUsize,
}

/// A running fake server; stops when dropped.
pub struct FakeLlm {
    address: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeLlm {
    /// Starts a server whose unscripted replies come from `responder`, called with the request
    /// and its index (from 0) among all requests received.
    pub async fn start(
        responder: impl Fn(&RecordedRequest, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let shared = Arc::new(Shared {
            script: Mutex::new(VecDeque::new()),
            responder: Box::new(responder),
            requests: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake llm server to 127.0.0.1:0");
        let address = listener.local_addr().expect("fake llm server address");
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fake llm server failed");
        });
        Self {
            address,
            shared,
            server,
        }
    }

    /// Starts a server that answers every request Llama-3 style (see [`recorded_answer`]).
    pub async fn recorded() -> Self {
        Self::start(|request, index| Reply::Answer(recorded_answer(request, index))).await
    }

    /// The API root to configure the client with (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.address)
    }

    /// Queues replies sent before the responder is asked, in order.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// How many requests arrived (counted on arrival, so a request the client gave up on
    /// counts too).
    pub fn request_count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// The requests received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let index = shared.count.fetch_add(1, Ordering::SeqCst);
    let request = RecordedRequest {
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string),
    };
    shared.requests.lock().unwrap().push(request.clone());
    let scripted = shared.script.lock().unwrap().pop_front();
    let reply = scripted.unwrap_or_else(|| (shared.responder)(&request, index));
    respond(reply).await
}

async fn respond(mut reply: Reply) -> Response {
    while let Reply::Delayed(delay, inner) = reply {
        tokio::time::sleep(delay).await;
        reply = *inner;
    }
    let completion = |content: Value, finish_reason: &str| {
        json_response(
            StatusCode::OK,
            json!({
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "fake-llama",
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": content },
                    "finish_reason": finish_reason,
                }],
                "usage": { "prompt_tokens": 200, "completion_tokens": 400, "total_tokens": 600 },
            }),
        )
    };
    match reply {
        Reply::Answer(text) => completion(Value::String(text), "stop"),
        Reply::Truncated(text) => completion(Value::String(text), "length"),
        Reply::NullContent => completion(Value::Null, "stop"),
        Reply::Status(code) => {
            let status = StatusCode::from_u16(code).expect("a valid http status");
            json_response(status, error_body(status))
        }
        Reply::RateLimited { retry_after_secs } => {
            let status = StatusCode::TOO_MANY_REQUESTS;
            let mut response = json_response(status, error_body(status));
            if let Some(seconds) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, seconds.into());
            }
            response
        }
        Reply::Raw(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response(),
        Reply::Delayed(..) => unreachable!("delays are unwrapped above"),
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn error_body(status: StatusCode) -> Value {
    json!({
        "object": "error",
        "message": format!("fake llm says {status}"),
        "type": status.canonical_reason().unwrap_or("error"),
        "code": status.as_u16(),
    })
}

/// Places for the recorded answers; with [`COMPANIONS`] and [`TIMES`] they make 420 distinct
/// lines.
const PLACES: &[&str] = &[
    "on a snowy hillside with pine trees in the background",
    "in a sunlit meadow full of wildflowers",
    "on a wooden porch of a farmhouse",
    "beside a stream in a dense forest",
    "on a sandy beach at low tide",
    "in a stunning autumn park covered in red leaves",
    "on a kitchen counter next to a window",
    "in a city street lined with brick buildings",
    "on a rocky mountain trail",
    "in a greenhouse with rows of potted plants",
    "on a beautiful lawn in front of a white fence",
    "in a library between tall bookshelves",
    "on a frozen lake under a grey sky",
    "in a desert with sand dunes and cacti",
];

const COMPANIONS: &[&str] = &[
    "",
    ", next to a red bicycle",
    ", beside a wicker basket of apples",
    ", near a stack of firewood",
    ", next to a blue ceramic bowl",
    ", beside an old leather boot",
];

const TIMES: &[&str] = &[
    "",
    " at dawn",
    " in light rain",
    " at dusk",
    " under a clear sky",
];

/// A Llama-3-style answer to `request`, the `index`-th the server received: N caption lines
/// about the prompt's subject, where N is the first number in the prompt ("Suggest 25 ...",
/// 10 if none). Consecutive answers overlap by a fifth, as sampled answers repeat each other.
/// Some lines carry subjective adjectives, one the quotes Llama likes, and the list is wrapped
/// in a preamble, a bold heading and a closing note.
pub fn recorded_answer(request: &RecordedRequest, index: usize) -> String {
    let prompt = request.user_prompt().unwrap_or_default();
    let count = first_number(prompt).unwrap_or(10).clamp(1, 200);
    let subject = prompt_subject(prompt);
    let first = index * (count - count / 5);
    let lines: Vec<String> = (first..first + count)
        .map(|n| {
            let place = PLACES[n % PLACES.len()];
            let companion = COMPANIONS[(n / PLACES.len()) % COMPANIONS.len()];
            let time = TIMES[(n / (PLACES.len() * COMPANIONS.len())) % TIMES.len()];
            let article = capitalised(indefinite_article(&subject));
            format!("{article} {subject} {place}{companion}{time}.")
        })
        .collect();
    llama_answer(&subject, &lines)
}

/// Wraps caption lines the way Llama-3-8B-Instruct presents a list.
pub fn llama_answer(subject: &str, lines: &[String]) -> String {
    let mut answer = format!(
        "Here are {} captions for images of {subject}:\n\n",
        lines.len()
    );
    let half = lines.len() / 2;
    for (n, line) in lines.iter().enumerate() {
        if n == half && n > 0 {
            answer.push_str("\n**Captions with another object:**\n\n");
        }
        if n % 3 == 0 {
            answer.push_str(&format!("{}. \"{line}\"\n", n + 1));
        } else {
            answer.push_str(&format!("{}. {line}\n", n + 1));
        }
    }
    answer.push_str(
        "\nNote: I've kept the captions factual and terse, without unnecessary adjectives or \
         speculation, as requested.",
    );
    answer
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn first_number(text: &str) -> Option<usize> {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|part| !part.is_empty())?
        .parse()
        .ok()
}

/// The subject of a prompt: what follows "images of" (minus "the following object:" and the
/// article) up to the end of the sentence.
fn prompt_subject(prompt: &str) -> String {
    let Some((_, rest)) = prompt.split_once("images of ") else {
        return "object".into();
    };
    let rest = rest.strip_prefix("the following object:").unwrap_or(rest);
    let rest = rest.trim_start();
    let rest = rest
        .strip_prefix("an ")
        .or_else(|| rest.strip_prefix("a "))
        .or_else(|| rest.strip_prefix("A "))
        .unwrap_or(rest);
    let end = rest.find(['.', '\n']).unwrap_or(rest.len());
    let subject = rest[..end].trim();
    if subject.is_empty() {
        "object".into()
    } else {
        subject.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_answers_follow_the_prompt() {
        let request = RecordedRequest {
            body: json!({"messages": [
                {"role": "system", "content": "expert"},
                {"role": "user", "content": "Suggest 4 captions for images of an alpaca. More."},
            ]}),
            authorization: None,
        };
        let answer = recorded_answer(&request, 0);
        assert!(answer.starts_with("Here are 4 captions for images of alpaca:"));
        assert!(answer.contains("1. \"An alpaca on a snowy hillside"));
        assert!(answer.contains("3. An alpaca on a wooden porch of a farmhouse.\n"));
        assert!(answer.trim_end().ends_with("as requested."));
        // Answers of 4 lines overlap by 4/5 = 0 lines: the next one starts at the fifth place.
        let next = recorded_answer(&request, 1);
        assert!(next.contains("1. \"An alpaca on a sandy beach at low tide.\""));
        assert!(!next.contains("snowy hillside"));
        assert_eq!(
            prompt_subject("Suggest 10 captions for images of the following object: A chair.\n"),
            "chair"
        );
        assert_eq!(prompt_subject("nothing"), "object");
    }
}
