//! The gallery: a small read-only website the coordinator serves on `gallery.listen`, for people
//! to look at what a run makes.
//!
//! | path | shows |
//! | --- | --- |
//! | `/` | the runs, with their groups counted by decision |
//! | `/runs/{run}?decision=D&page=N` | a run's groups (by name or id), filtered by decision, a page at a time |
//! | `/groups/{group}` | one group: its contact sheet and its record |
//! | `/groups/{group}/sheet.png` | the contact sheet, from S3 (drawn on the spot while the sheets loop has not stored it) |
//! | `/groups/{group}/record.json` | the record, as `syncd group show --json` prints it |
//!
//! It only reads: every route answers GET (and HEAD), nothing writes to the database or to S3.
//! Pages are built with `maud`, which escapes every value it inserts; every answer carries a
//! Content-Security-Policy that allows nothing but the gallery's own images and style sheet. It
//! has no authentication: keep its address on the loopback or a private network (it is off
//! unless `gallery.listen` is set).

use crate::admin;
use crate::groups::{self, DecisionFilter, GroupRecord};
use crate::pictures;
use anyhow::{Context, Result};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::Arc;
use syncd_infra::outage;
use syncd_infra::storage::Storage;
use syncd_proto::{GroupId, RunId};

/// Groups on one page of a run.
pub const PAGE_SIZE: i64 = 24;

const STYLE: &str = "
body { font-family: sans-serif; margin: 0; color: #222; background: #fafaf7; }
header { background: #263238; padding: 0.6em 1em; }
header a { color: #fff; text-decoration: none; font-weight: bold; }
main { padding: 1em; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }
nav a { margin-right: 1em; }
nav a.current { font-weight: bold; text-decoration: none; color: #222; }
ul.groups { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 1em; }
ul.groups li { width: 420px; background: #fff; border: 1px solid #ddd; padding: 0.5em; }
ul.groups img { width: 100%; height: auto; }
.badge { color: #fff; padding: 0.1em 0.4em; border-radius: 3px; background: #1565c0; }
.badge.accepted { background: #2e7d32; }
.badge.rejected { background: #c62828; }
.badge.near_duplicate { background: #e66a00; }
.badge.failed { background: #616161; }
img.sheet { max-width: 100%; height: auto; border: 1px solid #ccc; }
pre { background: #fff; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; }
";

/// What every answer carries: nothing loads from elsewhere, nothing runs, nothing frames it.
const SECURITY_POLICY: &str = "default-src 'none'; img-src 'self'; style-src 'self'; \
                               base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Gallery {
    pool: PgPool,
    storage: Storage,
}

/// Starts serving the gallery on `listen`; returns once it listens.
pub async fn serve(listen: SocketAddr, pool: PgPool, storage: Storage) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("serving the gallery on {listen}"))?;
    let app = router(pool, storage);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the gallery stopped");
        }
    });
    tracing::info!(%listen, "serving the gallery at http://{listen}/");
    Ok(())
}

/// The gallery's routes, all read-only.
pub fn router(pool: PgPool, storage: Storage) -> Router {
    Router::new()
        .route("/", get(runs_page))
        .route("/style.css", get(style))
        .route("/runs/{run}", get(run_page))
        .route("/groups/{group}", get(group_page))
        .route("/groups/{group}/sheet.png", get(sheet_png))
        .route("/groups/{group}/record.json", get(record_json))
        .fallback(|| async { PageError::not_found("no such page".into()) })
        .layer(axum::middleware::map_response(secure))
        .with_state(Arc::new(Gallery { pool, storage }))
}

async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// A page that could not be shown: its status and why, as a page.
struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn not_found(message: String) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message,
        }
    }
}

impl From<anyhow::Error> for PageError {
    fn from(error: anyhow::Error) -> Self {
        let message = format!("{error:#}");
        match outage::classify(&error) {
            Some(service) => {
                tracing::warn!(%service, error = %message, "a gallery page waits for an outage");
                Self {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: format!("the {service} is unreachable now; try again later"),
                }
            }
            None => {
                tracing::error!(error = %message, "a gallery page failed");
                Self {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message,
                }
            }
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("error");
        let body = html! {
            h1 { (title) }
            p.error { (self.message) }
            p { a href="/" { "All runs" } }
        };
        (self.status, Html(page(title, body).into_string())).into_response()
    }
}

type Page = Result<Html<String>, PageError>;

fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " - syncd gallery" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header { a href="/" { "syncd gallery" } }
                main { (body) }
            }
        }
    }
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

fn run_link(run: RunId, filter: DecisionFilter, page: i64) -> String {
    format!("/runs/{run}?decision={}&page={page}", filter.as_str())
}

async fn runs_page(State(gallery): State<Arc<Gallery>>) -> Page {
    let runs = admin::list_runs(&gallery.pool).await?;
    let decisions = &DecisionFilter::ALL[1..];
    let body = html! {
        h1 { "Runs" }
        @if runs.is_empty() {
            p { "No runs yet." }
        } @else {
            table.runs {
                thead { tr {
                    th { "run" } th { "state" }
                    @for decision in decisions { th { (decision.as_str().replace('_', " ")) } }
                    th { "dataset" } th { "created" }
                } }
                tbody {
                    @for run in &runs {
                        tr data-run=(run.name) {
                            td { a href=(run_link(run.id, DecisionFilter::All, 1)) { (run.name) } }
                            td { (run.state) }
                            @for decision in decisions {
                                td { (run.groups.get(decision.as_str()).copied().unwrap_or(0)) }
                            }
                            td { (run.dataset_state) }
                            td { (run.created_at.format("%Y-%m-%d %H:%M UTC")) }
                        }
                    }
                }
            }
        }
    };
    Ok(Html(page("Runs", body).into_string()))
}

#[derive(Debug, Deserialize)]
struct RunQuery {
    #[serde(default)]
    decision: DecisionFilter,
    page: Option<i64>,
}

async fn run_page(
    State(gallery): State<Arc<Gallery>>,
    Path(run): Path<String>,
    Query(query): Query<RunQuery>,
) -> Page {
    let pool = &gallery.pool;
    let id = match admin::resolve_run(pool, &run).await {
        Ok(id) => id,
        Err(error) if outage::classify(&error).is_some() => return Err(error.into()),
        Err(_) => return Err(PageError::not_found(format!("no run named {run:?}"))),
    };
    let summary = admin::summary(pool, id).await?;
    let filter = query.decision;
    let number = query.page.unwrap_or(1).max(1);
    let listed = groups::list(pool, id, filter, (number - 1) * PAGE_SIZE, PAGE_SIZE).await?;
    let count = |filter: DecisionFilter| -> i64 {
        match filter {
            DecisionFilter::All => summary.groups.values().sum(),
            other => summary.groups.get(other.as_str()).copied().unwrap_or(0),
        }
    };
    let first = (number - 1) * PAGE_SIZE + 1;
    let last = first + listed.groups.len() as i64 - 1;
    let body = html! {
        h1 { "Run " (summary.name) }
        p { (summary.state) ", dataset " (summary.dataset_state) " (" code { (summary.dataset_index) } ")" }
        nav.filters {
            @for option in DecisionFilter::ALL {
                a href=(run_link(id, option, 1))
                  class=(if option == filter { "current" } else { "" })
                  data-filter=(option.as_str()) {
                    (option.as_str().replace('_', " ")) " (" (count(option)) ")"
                }
            }
        }
        @if listed.groups.is_empty() {
            p.empty { "No " (filter.as_str().replace('_', " ")) " groups here." }
        } @else {
            p.range { "Groups " (first) " to " (last) " of " (listed.total) }
            ul.groups {
                @for group in &listed.groups { (group_card(group)) }
            }
        }
        nav.pages {
            @if number > 1 {
                a rel="prev" href=(run_link(id, filter, number - 1)) { "previous page" }
            }
            @if last < listed.total {
                a rel="next" href=(run_link(id, filter, number + 1)) { "next page" }
            }
        }
    };
    Ok(Html(
        page(&format!("Run {}", summary.name), body).into_string(),
    ))
}

fn group_card(group: &GroupRecord) -> Markup {
    let link = format!("/groups/{}", group.id);
    html! {
        li.group data-decision=(group.decision) data-group=(group.id) {
            @if group.image_keys.is_some() {
                a href=(link) {
                    img src=(format!("{link}/sheet.png")) loading="lazy"
                        alt=(format!("contact sheet of group {}", group.id));
                }
            }
            p {
                span class=(format!("badge {}", group.decision)) { (group.decision.replace('_', " ")) }
                " " a href=(link) { "object " (group.object_ordinal) ", group " (group.index) }
            }
            @if let Some(reason) = &group.reason { p.reason { (reason) } }
        }
    }
}

/// The group named in a path, or a 404 that says so.
async fn find_group(gallery: &Gallery, group: &str) -> Result<GroupRecord, PageError> {
    let missing = || PageError::not_found(format!("no group {group:?}"));
    let id: GroupId = group.parse().map_err(|_| missing())?;
    groups::load(&gallery.pool, id).await?.ok_or_else(missing)
}

async fn group_page(State(gallery): State<Arc<Gallery>>, Path(group): Path<String>) -> Page {
    let record = find_group(&gallery, &group).await?;
    let json = serde_json::to_string_pretty(&record).context("writing the record as JSON")?;
    let link = format!("/groups/{}", record.id);
    let body = html! {
        p.crumbs {
            a href="/" { "Runs" } " / "
            a href=(run_link(record.run_id, DecisionFilter::All, 1)) { (record.run_name) } " / "
            "object " (record.object_ordinal) ", group " (record.index)
        }
        h1 { "Group " (record.id) }
        p.decision {
            span class=(format!("badge {}", record.decision)) { (record.decision.replace('_', " ")) }
            " " (record.reason.as_deref().unwrap_or(""))
        }
        @if record.image_keys.is_some() {
            img.sheet src=(format!("{link}/sheet.png"))
                alt=(format!("contact sheet of group {}", record.id));
        } @else {
            p { "This group has no images." }
        }
        h2 { "Record" }
        p { a href=(format!("{link}/record.json")) { "record.json" } }
        pre id="record" { (json) }
    };
    Ok(Html(
        page(&format!("Group {}", record.id), body).into_string(),
    ))
}

async fn sheet_png(
    State(gallery): State<Arc<Gallery>>,
    Path(group): Path<String>,
) -> Result<Response, PageError> {
    let record = find_group(&gallery, &group).await?;
    if record.image_keys.is_none() {
        return Err(PageError::not_found(format!(
            "group {} has no images, so no contact sheet",
            record.id
        )));
    }
    let (png, _) = pictures::sheet(&gallery.storage, &record).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            // A group decided again gets a new sheet under the same address.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        png,
    )
        .into_response())
}

async fn record_json(
    State(gallery): State<Arc<Gallery>>,
    Path(group): Path<String>,
) -> Result<Response, PageError> {
    let record = find_group(&gallery, &group).await?;
    Ok(axum::Json(record).into_response())
}
