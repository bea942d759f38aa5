//! The prompt stage against a fake chat-completions server: the client's retry policy and error
//! kinds, and the generator's request counts, cleaning and failure on too few usable lines.

use secrecy::SecretString;
use std::time::{Duration, Instant};
use syncd_proto::messages::{CaptionRequests, FailureKind, ObjectSpec, PromptJob};
use syncd_tests::fake_llm::{llama_answer, recorded_answer, FakeLlm, RecordedRequest, Reply};
use syncd_worker::prompt::requests::{self, ChatMessage, RequestKind, SYSTEM_ROLE};
use syncd_worker::prompt::{
    LlmClient, LlmConfig, LlmError, LlmFailure, PromptConfig, PromptError, PromptGenerator,
};

/// A configuration for `fake` with fast retries, so failure tests take milliseconds.
fn fast_config(base_url: String) -> LlmConfig {
    let mut config = LlmConfig::new(base_url, "meta-llama/Meta-Llama-3-8B-Instruct");
    config.max_retries = 3;
    config.backoff_base = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(20);
    config.request_timeout = Duration::from_secs(10);
    config
}

fn client_for(fake: &FakeLlm) -> LlmClient {
    LlmClient::new(fast_config(fake.base_url())).unwrap()
}

fn generator_for(fake: &FakeLlm, concurrency: usize) -> PromptGenerator {
    let mut config = PromptConfig::new(fast_config(fake.base_url()));
    config.concurrency = concurrency;
    PromptGenerator::new(config).unwrap()
}

fn question() -> Vec<ChatMessage> {
    requests::messages(RequestKind::DeformableBackgrounds, "fox", 5)
}

fn asked(requests: u32, per_request: u32, at_least: u32) -> CaptionRequests {
    CaptionRequests {
        requests,
        per_request,
        at_least,
    }
}

/// A rigid asset's job as the coordinator plans it: one request of 10, `at_least` needed.
fn rigid_job(at_least: u32) -> PromptJob {
    PromptJob {
        object: ObjectSpec::Rigid {
            uid: "8a2c4e1f".into(),
            caption: "A wooden chair with a woven seat.".into(),
            asset_key: "assets/8a2c4e1f.glb".into(),
        },
        backgrounds: asked(1, 10, at_least),
        // Ignored for rigid objects.
        descriptions: asked(6, 25, 1),
    }
}

fn fox_job(backgrounds: CaptionRequests, descriptions: CaptionRequests) -> PromptJob {
    PromptJob {
        object: ObjectSpec::Deformable {
            category: "Fox".into(),
            description: String::new(),
        },
        backgrounds,
        descriptions,
    }
}

fn assert_clean(lines: &[String]) {
    for line in lines {
        assert_eq!(line, &line.to_lowercase(), "{line}");
        assert_eq!(line, line.trim(), "{line}");
        for meta in ["here are", "note:", "**", "\"", "captions"] {
            assert!(!line.contains(meta), "{line:?} contains {meta:?}");
        }
        assert!(!line.starts_with(|c: char| c.is_ascii_digit()), "{line}");
    }
    let mut distinct = lines.to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), lines.len(), "duplicates in {lines:?}");
}

#[tokio::test]
async fn the_client_sends_the_reference_sampling_and_the_api_key() {
    let fake = FakeLlm::recorded().await;
    let mut config = fast_config(fake.base_url());
    config.api_key = Some(SecretString::from("sk-test-key"));
    let client = LlmClient::new(config).unwrap();

    let answer = client.chat(&question()).await.unwrap();
    assert!(answer
        .content
        .starts_with("Here are 5 captions for images of fox:"));
    assert!(!answer.truncated);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let body = &requests[0].body;
    assert_eq!(body["model"], "meta-llama/Meta-Llama-3-8B-Instruct");
    assert_eq!(body["temperature"].as_f64().unwrap() as f32, 0.6);
    assert_eq!(body["top_p"].as_f64().unwrap() as f32, 0.9);
    assert_eq!(body["max_tokens"], 2048);
    assert_eq!(requests[0].message("system"), Some(SYSTEM_ROLE));
    assert_eq!(
        requests[0].user_prompt(),
        Some(requests::user_prompt(RequestKind::DeformableBackgrounds, "fox", 5).as_str())
    );
    assert_eq!(
        requests[0].authorization.as_deref(),
        Some("Bearer sk-test-key")
    );
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retried() {
    let fake = FakeLlm::recorded().await;
    fake.push([
        Reply::Status(500),
        Reply::RateLimited {
            retry_after_secs: Some(0),
        },
        Reply::Status(503),
    ]);
    let answer = client_for(&fake).chat(&question()).await.unwrap();
    assert!(answer
        .content
        .starts_with("Here are 5 captions for images of fox:"));
    assert_eq!(fake.request_count(), 4);
}

#[tokio::test]
async fn persistent_server_errors_end_as_transient_after_the_retries() {
    let fake = FakeLlm::start(|_, _| Reply::Status(502)).await;
    let error = client_for(&fake).chat(&question()).await.unwrap_err();
    assert_eq!(fake.request_count(), 4, "1 attempt + 3 retries");
    assert_eq!(error.failure_kind(), FailureKind::Transient);
    let LlmError::Transient { attempts, failure } = &error else {
        panic!("expected a transient error, got {error:?}");
    };
    assert_eq!(*attempts, 4);
    assert!(matches!(failure, LlmFailure::Status { status: 502, .. }));
    assert!(error.to_string().contains("after 4 attempt(s)"), "{error}");
}

#[tokio::test]
async fn other_client_errors_are_permanent_at_once() {
    for status in [400, 401, 404, 422] {
        let fake = FakeLlm::recorded().await;
        fake.push([Reply::Status(status)]);
        let error = client_for(&fake).chat(&question()).await.unwrap_err();
        assert_eq!(fake.request_count(), 1, "status {status} was retried");
        assert_eq!(error.failure_kind(), FailureKind::Permanent);
        assert!(
            matches!(error.failure(), LlmFailure::Status { status: s, body } if *s == status && body.contains("fake llm says")),
            "{error:?}"
        );
    }
}

#[tokio::test]
async fn a_wrong_base_url_is_a_permanent_404() {
    let fake = FakeLlm::recorded().await;
    let wrong = fake.base_url().trim_end_matches("/v1").to_string();
    let client = LlmClient::new(fast_config(wrong)).unwrap();
    let error = client.chat(&question()).await.unwrap_err();
    assert!(
        matches!(
            error,
            LlmError::Permanent {
                failure: LlmFailure::Status { status: 404, .. }
            }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retried() {
    let fake = FakeLlm::recorded().await;
    let slow = || Reply::delayed(Duration::from_secs(5), Reply::Answer("1. too late".into()));
    fake.push([slow()]);
    let mut config = fast_config(fake.base_url());
    config.request_timeout = Duration::from_millis(200);
    config.max_retries = 1;
    let client = LlmClient::new(config).unwrap();

    // The first attempt times out, the retry gets the recorded answer.
    let answer = client.chat(&question()).await.unwrap();
    assert!(answer.content.starts_with("Here are 5 captions"));
    assert_eq!(fake.request_count(), 2);

    // Timing out on every attempt is transient.
    fake.push([slow(), slow()]);
    let started = Instant::now();
    let error = client.chat(&question()).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout did not apply"
    );
    assert!(
        matches!(
            error,
            LlmError::Transient {
                attempts: 2,
                failure: LlmFailure::Timeout(_)
            }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_transient() {
    // Bind and release a port so that nothing listens on it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = LlmClient::new(fast_config(format!("http://127.0.0.1:{port}/v1"))).unwrap();
    let error = client.chat(&question()).await.unwrap_err();
    assert!(
        matches!(
            error,
            LlmError::Transient {
                attempts: 4,
                failure: LlmFailure::Transport(_)
            }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let fake = FakeLlm::recorded().await;
    fake.push([Reply::RateLimited {
        retry_after_secs: Some(1),
    }]);
    let mut config = fast_config(fake.base_url());
    config.backoff_max = Duration::from_secs(5);
    let started = Instant::now();
    LlmClient::new(config)
        .unwrap()
        .chat(&question())
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(950));
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn answers_that_are_not_chat_completions_are_permanent_errors() {
    let nonsense: [&[u8]; 5] = [
        b"<html>502 Bad Gateway</html>",
        br#"{"object":"chat.completion","model":"llama"}"#,
        br#"{"choices":[]}"#,
        b"{\"choices\":[{\"message\":{\"content\":\"\xc3\x28 fox\"}}]}",
        br#"{"choices":[{"message":{"content":"1. a fox"#,
    ];
    for body in nonsense {
        let fake = FakeLlm::recorded().await;
        fake.push([Reply::Raw(body.to_vec())]);
        let error = client_for(&fake).chat(&question()).await.unwrap_err();
        assert_eq!(fake.request_count(), 1);
        assert!(
            matches!(
                &error,
                LlmError::Permanent {
                    failure: LlmFailure::Malformed(_)
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("not a chat completion"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn a_rigid_object_gets_ten_clean_backgrounds_from_one_request() {
    let fake = FakeLlm::recorded().await;
    let output = generator_for(&fake, 4).run(&rigid_job(3)).await.unwrap();

    assert_eq!(fake.request_count(), 1);
    assert_eq!(
        fake.requests()[0].user_prompt(),
        Some(
            requests::user_prompt(
                RequestKind::RigidBackgrounds,
                "A wooden chair with a woven seat.",
                10
            )
            .as_str()
        )
    );
    assert_eq!(output.backgrounds.len(), 10);
    assert!(
        output.descriptions.is_empty(),
        "rigid objects get no descriptions"
    );
    assert_clean(&output.backgrounds);
    // In the order the model wrote them, subjective words scrubbed.
    assert_eq!(
        output.backgrounds[0],
        "a wooden chair with a woven seat on a snowy hillside with pine trees in the background."
    );
    assert_eq!(
        output.backgrounds[5],
        "a wooden chair with a woven seat in an autumn park covered in red leaves."
    );
    for line in &output.backgrounds {
        assert!(
            !line.contains("stunning") && !line.contains("beautiful"),
            "{line}"
        );
    }
}

/// Routes fox background requests to recorded answers with a few off-category lines mixed in,
/// and description requests to distinct descriptions.
fn fox_responder(request: &RecordedRequest, index: usize) -> Reply {
    let prompt = request.user_prompt().unwrap_or_default();
    if prompt == requests::user_prompt(RequestKind::DeformableBackgrounds, "Fox", 25) {
        let mut answer = recorded_answer(request, index);
        answer.push_str("\n26. A dog chasing a ball in a park.\n27. A red foxglove in a garden.");
        Reply::Answer(answer)
    } else if prompt == requests::user_prompt(RequestKind::DeformableDescriptions, "Fox", 25) {
        let colours = ["red", "grey", "silver", "white", "brown"];
        let kinds = ["arctic", "fennec", "red", "corsac", "kit", "swift"];
        let lines: Vec<String> = (0..25)
            .map(|n| {
                let n = n + 10 * index;
                format!(
                    "The {} fox has {} fur with a {} tail tip.",
                    kinds[n % kinds.len()],
                    colours[(n / kinds.len()) % colours.len()],
                    colours[(n / 30) % colours.len()],
                )
            })
            .collect();
        Reply::Answer(llama_answer("fox", &lines))
    } else {
        Reply::Status(400)
    }
}

#[tokio::test]
async fn a_category_gets_six_requests_per_list_cleaned_and_deduplicated_across_them() {
    let fake = FakeLlm::start(fox_responder).await;
    let output = generator_for(&fake, 1)
        .run(&fox_job(asked(6, 25, 3), asked(6, 25, 1)))
        .await
        .unwrap();

    // The reference's 6 x 25 per list and no more: the lists hold far more than they need.
    assert_eq!(fake.request_count(), 12);
    // Consecutive background answers overlap by 5 lines: 6 x 25 - 5 x 5 distinct ones, the
    // off-category lines dropped. Description answers overlap by 15: 25 + 5 x 10.
    assert_eq!(output.backgrounds.len(), 125);
    assert_eq!(output.descriptions.len(), 75);
    assert_clean(&output.backgrounds);
    assert_clean(&output.descriptions);
    for line in &output.backgrounds {
        assert!(line.contains("fox ") || line.contains("fox."), "{line}");
        assert!(
            !line.contains("dog") && !line.contains("foxglove"),
            "{line}"
        );
    }
    assert_eq!(
        output.backgrounds[0],
        "a fox on a snowy hillside with pine trees in the background."
    );
    // The background stage asked first, then the descriptions.
    let prompts: Vec<String> = fake
        .requests()
        .iter()
        .map(|request| request.user_prompt().unwrap().to_string())
        .collect();
    assert!(prompts[..6].iter().all(|p| p.contains("different styles")));
    assert!(prompts[6..].iter().all(|p| p.contains("subspecies")));
    // In the order the requests were sent and the lines written: the first answer's first line.
    assert_eq!(
        output.descriptions[0],
        "the arctic fox has red fur with a silver tail tip."
    );

    // The same answers give the same lists, line for line.
    let again = FakeLlm::start(fox_responder).await;
    let repeated = generator_for(&again, 1)
        .run(&fox_job(asked(6, 25, 3), asked(6, 25, 1)))
        .await
        .unwrap();
    assert_eq!(repeated, output);
}

#[tokio::test]
async fn concurrent_requests_keep_every_distinct_line() {
    let fake = FakeLlm::start(fox_responder).await;
    let output = generator_for(&fake, 4)
        .run(&fox_job(asked(6, 25, 3), CaptionRequests::NONE))
        .await
        .unwrap();
    assert_eq!(fake.request_count(), 6);
    assert_eq!(output.backgrounds.len(), 125);
    assert!(output.descriptions.is_empty());
    assert_clean(&output.backgrounds);
}

#[tokio::test]
async fn a_list_short_of_what_it_needs_asks_again_within_the_budget() {
    let fake = FakeLlm::start(fox_responder).await;
    // 2 requests give 45 distinct lines; 60 are needed: one more request of 25 fills it.
    let output = generator_for(&fake, 1)
        .run(&fox_job(asked(2, 25, 60), CaptionRequests::NONE))
        .await
        .unwrap();
    assert_eq!(fake.request_count(), 3);
    assert_eq!(output.backgrounds.len(), 65);
}

#[tokio::test]
async fn an_llm_that_answers_nothing_usable_fails_after_the_budget() {
    let answers = [
        Reply::Answer(String::new()),
        Reply::NullContent,
        Reply::Answer("Here are 10 captions:\n\nNote: I cannot help with that.".into()),
        Reply::Answer("I'm sorry, but I can't suggest captions for this.".into()),
        Reply::Answer("1.\n2.\n3.\n".into()),
    ];
    let fake = FakeLlm::start(move |_, index| answers[index % answers.len()].clone()).await;
    let error = generator_for(&fake, 1)
        .run(&rigid_job(10))
        .await
        .unwrap_err();
    // One request would fill the list, four more are allowed.
    assert_eq!(fake.request_count(), 5);
    assert_eq!(error.failure_kind(), FailureKind::Permanent);
    assert!(
        matches!(
            &error,
            PromptError::TooFewLines {
                obtained: 0,
                wanted: 10,
                requests: 5,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("only 0 usable rigid background captions"),
        "{message}"
    );
    assert!(message.contains("10 were asked for"), "{message}");
}

#[tokio::test]
async fn repeated_lines_count_once() {
    let same = "Sure! Here are the captions:\n1. A fox in the snow.\n2. A fox by a lake.\n\
                3. \"A fox in the snow.\"\n4. A fox under a bridge.";
    let fake = FakeLlm::start(move |_, _| Reply::Answer(same.into())).await;
    let error = generator_for(&fake, 2)
        .run(&fox_job(asked(1, 5, 5), CaptionRequests::NONE))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            PromptError::TooFewLines {
                obtained: 3,
                wanted: 5,
                requests: 5,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(fake.request_count(), 5);
}

#[tokio::test]
async fn a_truncated_answer_loses_its_cut_line() {
    let fake = FakeLlm::recorded().await;
    fake.push([Reply::Truncated(
        "1. A fox in the snow.\n2. A fox by a lake.\n3. A fox under a bri".into(),
    )]);
    let output = generator_for(&fake, 1)
        .run(&fox_job(asked(1, 3, 2), CaptionRequests::NONE))
        .await
        .unwrap();
    assert_eq!(
        output.backgrounds,
        ["a fox in the snow.", "a fox by a lake."]
    );
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn llm_errors_keep_their_kind_through_the_generator() {
    let fake = FakeLlm::start(|_, _| Reply::Status(400)).await;
    let error = generator_for(&fake, 4)
        .run(&fox_job(asked(6, 25, 3), asked(6, 25, 1)))
        .await
        .unwrap_err();
    assert_eq!(error.failure_kind(), FailureKind::Permanent);
    assert!(
        error
            .to_string()
            .starts_with("asking for deformable background captions of \"Fox\": "),
        "{error}"
    );
    assert!(error.to_string().contains("http status 400"), "{error}");

    let fake = FakeLlm::start(|_, _| Reply::Status(503)).await;
    let error = generator_for(&fake, 1)
        .run(&rigid_job(10))
        .await
        .unwrap_err();
    assert_eq!(error.failure_kind(), FailureKind::Transient);
}

#[tokio::test]
async fn nothing_is_asked_for_nothing_and_bad_jobs_are_refused() {
    let fake = FakeLlm::recorded().await;
    let generator = generator_for(&fake, 1);
    let output = generator
        .run(&fox_job(CaptionRequests::NONE, CaptionRequests::NONE))
        .await
        .unwrap();
    assert!(output.backgrounds.is_empty() && output.descriptions.is_empty());
    // Lines needed with no request to get them: the job is wrong, the LLM is not asked.
    let error = generator
        .run(&fox_job(asked(0, 25, 3), CaptionRequests::NONE))
        .await
        .unwrap_err();
    assert!(matches!(error, PromptError::InvalidJob(_)), "{error:?}");

    let mut job = rigid_job(10);
    job.object = ObjectSpec::Rigid {
        uid: "0000".into(),
        caption: "  ".into(),
        asset_key: "assets/0000.glb".into(),
    };
    let error = generator.run(&job).await.unwrap_err();
    assert!(matches!(error, PromptError::InvalidJob(_)), "{error:?}");
    assert_eq!(error.failure_kind(), FailureKind::Permanent);
    assert_eq!(fake.request_count(), 0);
}
