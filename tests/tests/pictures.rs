//! Pictures of groups end to end: a run through the real coordinator and test workers (whose
//! images are gradients with a centred square mask), then
//!
//! - a contact sheet for every decided group in S3, beside its images: a PNG of the documented
//!   width that holds the group's image pixels and the masks' outlines;
//! - `syncd group show` (text, JSON, `--sheet`) and `syncd run sheet --accepted|--rejected`, and
//!   their one-line errors;
//! - the gallery the coordinator serves, in headless Chromium: the run list, the decision filter,
//!   a group page embedding its sheet (its screenshot must show the gradients), escaping;
//! - a group whose image went missing: its sheet fails with a clear logged error, kept on the
//!   group, and is not tried again for a minute.
//!
//! Without Chromium the browser part fails when `CI=true` and is skipped, saying why, otherwise.
//! `SYNCD_TEST_SCREENSHOTS=DIR` keeps a copy of the screenshots and a sheet in DIR.

use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use syncd_coordinator::sheets::{sheet_width, OUTLINE, TILE};
use syncd_tests::factory::{Factory, FILTER_ONLY_DARK_FAILS_ON_LOOKS};
use syncd_tests::processes::{free_address, http_get, http_request, wait_for};
use uuid::Uuid;

const RUN: &str = "pictures";
/// One group per object: one always rejected (its images are painted black, [`DARK`]), and
/// enough others that the hash-derived pair scores accept some.
const OBJECTS: usize = 12;
/// The description marker of the object whose images the test workers paint black, and whose
/// group the filter therefore rejects on looks (the test scorer scores a black image 0).
const DARK: &str = "markings number 3";
/// What the test workers paint: 64 x 64 images.
const IMAGE_SIDE: usize = 64;

#[tokio::test(flavor = "multi_thread")]
async fn decided_groups_get_sheets_the_cli_draws_them_and_the_gallery_shows_them() -> Result<()> {
    let gallery = free_address()?;
    let mut factory = Factory::start_with_coordinator_env(
        0,
        0,
        &[
            ("SYNCD_GALLERY__LISTEN", gallery.as_str()),
            ("SYNCD_LOOPS__SHEET_INTERVAL_MS", "200"),
        ],
    )
    .await?;
    for index in 0..2 {
        factory.start_worker_env(
            &format!("worker-{index}"),
            0,
            &["generate", "score"],
            &[("SYNCD_TEST_DARK_ON", DARK)],
        )?;
    }
    // Both decisions are made whatever the groups' ids: the dark object's group is rejected, the
    // others are each accepted with probability 0.97.
    // Markup in a description must reach the pages as text.
    let created = factory.create_run_described(
        RUN,
        OBJECTS,
        FILTER_ONLY_DARK_FAILS_ON_LOOKS,
        |index, category| {
            format!("a {category} with <b>bold</b> & \"quoted\" markings number {index}")
        },
    )?;
    let run_id = created["id"].as_str().context("run id")?.to_string();
    factory
        .wait_until_completed(RUN, Duration::from_secs(240))
        .await?;
    let groups = sheets_of_every_decided_group(&factory, &run_id).await?;
    let accepted: Vec<&Group> = groups.iter().filter(|g| g.decision == "accepted").collect();
    let rejected: Vec<&Group> = groups.iter().filter(|g| g.decision == "rejected").collect();
    ensure!(
        !accepted.is_empty() && !rejected.is_empty(),
        "the filter both accepts and rejects: {:?}",
        groups.iter().map(|g| &g.decision).collect::<Vec<_>>()
    );
    let screenshots = std::env::var_os("SYNCD_TEST_SCREENSHOTS").map(PathBuf::from);
    if let Some(folder) = &screenshots {
        std::fs::create_dir_all(folder)?;
        std::fs::write(folder.join("contact-sheet.png"), &accepted[0].sheet_png)?;
    }

    cli_commands(&factory, &accepted, &rejected).await?;
    gallery_answers(&gallery, &run_id, &groups).await?;
    match chromium() {
        Some(browser) => {
            let browser = Browser::new(browser, factory.env.path("chromium"))?;
            gallery_in_a_browser(&factory, &browser, &gallery, &run_id, &groups, &screenshots)
                .await?;
        }
        None => unavailable("chromium is not installed (scripts/setup.sh installs it)")?,
    }
    a_missing_image_fails_its_sheet_once(&factory, accepted[0]).await?;
    factory.finish().await
}

/// A group as the database has it: id, decision, image keys, sheet key, sheet error.
type GroupRow = (Uuid, String, Value, Option<String>, Option<String>);

/// A decided group with its images and stored sheet.
struct Group {
    id: Uuid,
    decision: String,
    images: Vec<RgbImage>,
    image_keys: Vec<String>,
    sheet_png: Vec<u8>,
}

/// Waits until every decided group has a sheet, and checks each: beside the group's images, the
/// documented width, the group's pixels and its masks' outlines in it.
async fn sheets_of_every_decided_group(factory: &Factory, run_id: &str) -> Result<Vec<Group>> {
    let pool = factory.env.pool().await?;
    wait_for(
        "a contact sheet for every decided group",
        Duration::from_secs(60),
        || async {
            let (missing,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM groups WHERE decision <> 'pending' AND sheet_at IS NULL",
            )
            .fetch_one(&pool)
            .await?;
            Ok((missing == 0).then_some(()))
        },
    )
    .await
    .with_context(|| factory.logs())?;
    let rows: Vec<GroupRow> = sqlx::query_as(
        "SELECT g.id, g.decision, g.image_keys, g.sheet_key, g.sheet_error
         FROM groups g JOIN objects o ON o.id = g.object_id ORDER BY o.ordinal, g.group_index",
    )
    .fetch_all(&pool)
    .await?;
    ensure!(
        rows.len() == OBJECTS,
        "one group per object: {}",
        rows.len()
    );
    let storage = factory.env.storage();
    let mut groups = Vec::new();
    for (id, decision, image_keys, sheet_key, sheet_error) in rows {
        ensure!(sheet_error.is_none(), "group {id}: {sheet_error:?}");
        let expected = format!("runs/{run_id}/groups/{id}/sheet.png");
        ensure!(
            sheet_key.as_deref() == Some(expected.as_str()),
            "{sheet_key:?}"
        );
        let sheet_png = storage.get(&expected).await?.to_vec();
        let sheet = decode(&sheet_png)?;
        let image_keys: Vec<String> = serde_json::from_value(image_keys)?;
        ensure!(
            sheet.width() == sheet_width(image_keys.len()) && sheet.height() > TILE,
            "sheet of {id} is {}x{}",
            sheet.width(),
            sheet.height()
        );
        let mut images = Vec::new();
        for key in &image_keys {
            let image = decode(&storage.get(key).await?)?;
            // Each image is enlarged 6 times into its tile: its colours cover that much sheet.
            let shown = shared_pixels(&sheet, &image);
            ensure!(
                shown >= IMAGE_SIDE * IMAGE_SIDE * 36 * 3 / 4,
                "{key} shows in {shown} pixels of the sheet of {id}"
            );
            images.push(image);
        }
        let outline = sheet.pixels().filter(|pixel| pixel.0 == OUTLINE).count();
        ensure!(
            outline >= image_keys.len() * 4 * 190 * 2,
            "masks outlined: {outline} pixels"
        );
        groups.push(Group {
            id,
            decision,
            images,
            image_keys,
            sheet_png,
        });
    }
    Ok(groups)
}

async fn cli_commands(factory: &Factory, accepted: &[&Group], rejected: &[&Group]) -> Result<()> {
    let group = accepted[0];
    let id = group.id.to_string();
    let text = factory.cli(&["group", "show", &id])?;
    ensure!(
        text.contains(&format!("group {id}"))
            && text.contains("decision: accepted")
            && text.contains("sheet:    runs/"),
        "{text}"
    );
    let record = factory.cli_json(&["group", "show", &id])?;
    ensure!(record["id"] == id.as_str() && record["decision"] == "accepted");
    ensure!(
        record["run_name"] == RUN && record["prompts"].as_array().is_some_and(|p| p.len() == 3)
    );
    ensure!(record["sheet"]["key"]
        .as_str()
        .is_some_and(|key| key.ends_with("/sheet.png")));

    // --sheet writes the stored sheet.
    let out = factory.env.path("group-sheet.png");
    factory.cli(&["group", "show", &id, "--sheet", &out.to_string_lossy()])?;
    ensure!(std::fs::read(&out)? == group.sheet_png, "the sheet in S3");

    let unknown = Uuid::new_v4().to_string();
    let error = factory.cli(&["group", "show", &unknown]).unwrap_err();
    ensure!(
        format!("{error}").contains(&format!("no group {unknown}")),
        "{error}"
    );

    // Grids: exactly the groups of the decision asked for, each image's pixels 2 x 2.
    for (flag, members, limit) in [("--accepted", accepted, 64), ("--rejected", rejected, 2)] {
        let out = factory.env.path(&format!("grid{flag}.png"));
        let answer = factory.cli_json(&[
            "run",
            "sheet",
            RUN,
            flag,
            "-n",
            &limit.to_string(),
            "--out",
            &out.to_string_lossy(),
        ])?;
        let shown = members.len().min(limit);
        ensure!(
            answer["groups"] == shown && answer["total"] == members.len(),
            "{answer}"
        );
        let grid = decode(&std::fs::read(&out)?)?;
        for member in &members[..shown] {
            for image in &member.images {
                let pixels = shared_pixels(&grid, image);
                ensure!(
                    pixels >= IMAGE_SIDE * IMAGE_SIDE * 4 * 3 / 4,
                    "group {} in the {flag} grid: {pixels} pixels",
                    member.id
                );
            }
        }
    }
    let out = factory.env.path("none.png").to_string_lossy().to_string();
    let error = factory
        .cli(&["run", "sheet", "no-such-run", "--accepted", "--out", &out])
        .unwrap_err();
    ensure!(
        format!("{error}").contains("no run named \"no-such-run\""),
        "{error}"
    );
    ensure!(
        factory.cli(&["run", "sheet", RUN, "--out", &out]).is_err(),
        "a decision is required"
    );
    Ok(())
}

/// The gallery over plain HTTP: status codes, headers, JSON, read-only.
async fn gallery_answers(gallery: &str, run_id: &str, groups: &[Group]) -> Result<()> {
    let (status, answer) = http_get(gallery, "/", None).await?;
    ensure!(status == 200, "{answer}");
    let headers = answer
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_lowercase();
    ensure!(
        headers.contains("content-security-policy: default-src 'none'"),
        "{headers}"
    );
    ensure!(headers.contains("content-type: text/html"), "{headers}");

    let group = &groups[0];
    let (status, answer) =
        http_get(gallery, &format!("/groups/{}/record.json", group.id), None).await?;
    ensure!(status == 200, "{answer}");
    let record: Value = serde_json::from_str(body(&answer))?;
    ensure!(record["id"] == group.id.to_string() && record["decision"] == group.decision.as_str());
    ensure!(record["image_keys"] == serde_json::json!(group.image_keys));

    for (path, expected) in [
        (format!("/groups/{}", Uuid::new_v4()), 404),
        ("/groups/not-a-group".to_string(), 404),
        ("/runs/no-such-run".to_string(), 404),
        (format!("/runs/{run_id}?decision=bogus"), 400),
        ("/nothing/here".to_string(), 404),
    ] {
        let (status, answer) = http_get(gallery, &path, None).await?;
        ensure!(status == expected, "{path}: {status}: {answer}");
    }
    // It only reads.
    for method in ["POST", "PUT", "DELETE"] {
        let path = format!("/groups/{}", group.id);
        let (status, _) = http_request(gallery, method, &path, None).await?;
        ensure!(status == 405, "{method} {path}: {status}");
    }
    Ok(())
}

async fn gallery_in_a_browser(
    factory: &Factory,
    browser: &Browser,
    gallery: &str,
    run_id: &str,
    groups: &[Group],
    screenshots: &Option<PathBuf>,
) -> Result<()> {
    let base = format!("http://{gallery}");
    let runs = browser.dump_dom(&format!("{base}/")).await?;
    ensure!(runs.contains(&format!("data-run=\"{RUN}\"")), "{runs}");
    ensure!(
        runs.contains(&format!("href=\"/runs/{run_id}?decision=all&amp;page=1\"")),
        "{runs}"
    );

    // The filter shows the groups of one decision, and all of them.
    for decision in ["accepted", "rejected", "all"] {
        let dom = browser
            .dump_dom(&format!("{base}/runs/{run_id}?decision={decision}"))
            .await?;
        let shown = attribute_values(&dom, "data-decision");
        let expected: Vec<String> = groups
            .iter()
            .filter(|group| decision == "all" || group.decision == decision)
            .map(|group| group.decision.clone())
            .collect();
        ensure!(shown == expected, "{decision}: {shown:?} != {expected:?}");
        let listed = attribute_values(&dom, "data-group");
        ensure!(listed.len() == expected.len(), "{listed:?}");
    }
    let beyond = browser
        .dump_dom(&format!("{base}/runs/{RUN}?decision=all&page=2"))
        .await?;
    ensure!(
        attribute_values(&beyond, "data-decision").is_empty(),
        "{beyond}"
    );
    ensure!(beyond.contains("rel=\"prev\""), "{beyond}");

    // A group page embeds its sheet, and its record as text: markup in it stays text.
    let group = groups
        .iter()
        .find(|group| group.decision == "accepted")
        .context("an accepted group")?;
    let page = format!("{base}/groups/{}", group.id);
    let dom = browser.dump_dom(&page).await?;
    ensure!(
        dom.contains(&format!("src=\"/groups/{}/sheet.png\"", group.id)),
        "{dom}"
    );
    ensure!(
        dom.contains("&lt;b&gt;bold&lt;/b&gt; &amp; \\\"quoted\\\""),
        "{dom}"
    );
    ensure!(
        !dom.contains("<b>bold</b>"),
        "markup from the data was not escaped"
    );

    // What a person sees: the sheet, at its own size, shows the group's gradients.
    let shot = factory.env.path("group-page.png");
    let picture = browser.screenshot(&page, &shot, (1300, 1500)).await?;
    ensure!(
        distinct_colours(&picture) > 500,
        "the group page looks blank"
    );
    for (index, image) in group.images.iter().enumerate() {
        let pixels = shared_pixels(&picture, image);
        ensure!(
            pixels >= IMAGE_SIDE * IMAGE_SIDE * 36 / 2,
            "image {index} of group {} shows in {pixels} pixels of the screenshot {}",
            group.id,
            shot.display()
        );
    }
    let outline = picture.pixels().filter(|pixel| pixel.0 == OUTLINE).count();
    ensure!(outline > 1000, "mask outlines in the screenshot: {outline}");

    let list = factory.env.path("run-page.png");
    let listing = browser
        .screenshot(
            &format!("{base}/runs/{run_id}?decision=accepted"),
            &list,
            (1400, 1000),
        )
        .await?;
    ensure!(distinct_colours(&listing) > 500, "the run page looks blank");
    let first = &group.images[0];
    ensure!(
        shared_pixels(&listing, first) > 100,
        "the accepted group's sheet shows in the run page"
    );
    if let Some(folder) = screenshots {
        std::fs::copy(&shot, folder.join("gallery-group.png"))?;
        std::fs::copy(&list, folder.join("gallery-run-accepted.png"))?;
    }
    Ok(())
}

/// Deletes an image of `group` and asks for its sheet again: the failure is logged with its
/// cause, kept on the group, and not tried again at once.
async fn a_missing_image_fails_its_sheet_once(factory: &Factory, group: &Group) -> Result<()> {
    let pool = factory.env.pool().await?;
    let storage = factory.env.storage();
    storage.delete(&group.image_keys[..1]).await?;
    sqlx::query("UPDATE groups SET sheet_at = NULL WHERE id = $1")
        .bind(group.id)
        .execute(&pool)
        .await?;
    let (error, failures): (String, i32) = wait_for(
        "the sheet of a group without its image to fail",
        Duration::from_secs(30),
        || async {
            Ok(sqlx::query_as(
                "SELECT sheet_error, sheet_failures FROM groups
                 WHERE id = $1 AND sheet_error IS NOT NULL",
            )
            .bind(group.id)
            .fetch_optional(&pool)
            .await?)
        },
    )
    .await
    .with_context(|| factory.logs())?;
    ensure!(
        error.contains(&format!("image 0 of group {}", group.id))
            && error.contains(&group.image_keys[0]),
        "{error}"
    );
    ensure!(failures == 1);
    // Tried again in a minute, not on the loop's next pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (failures, waits): (i32, bool) = sqlx::query_as(
        "SELECT sheet_failures, sheet_retry_at > now() + interval '50 seconds' FROM groups
         WHERE id = $1",
    )
    .bind(group.id)
    .fetch_one(&pool)
    .await?;
    ensure!(failures == 1 && waits, "failures {failures}, waits {waits}");
    let log = factory
        .coordinator
        .as_ref()
        .context("coordinator")?
        .log_text();
    ensure!(
        log.contains(&format!(
            "cannot make the contact sheet of group {}",
            group.id
        )),
        "the coordinator logs the failure"
    );
    let text = factory.cli(&["group", "show", &group.id.to_string()])?;
    ensure!(text.contains("sheet:    failed ("), "{text}");
    Ok(())
}

fn decode(png: &[u8]) -> Result<RgbImage> {
    Ok(image::load_from_memory(png)
        .context("decoding a PNG")?
        .to_rgb8())
}

/// How many pixels of `haystack` have a colour of `needle`.
fn shared_pixels(haystack: &RgbImage, needle: &RgbImage) -> usize {
    let colours: HashSet<[u8; 3]> = needle.pixels().map(|pixel| pixel.0).collect();
    haystack
        .pixels()
        .filter(|pixel| colours.contains(&pixel.0))
        .count()
}

fn distinct_colours(image: &RgbImage) -> usize {
    image
        .pixels()
        .map(|pixel| pixel.0)
        .collect::<HashSet<_>>()
        .len()
}

/// The body of an HTTP answer.
fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Every value of `attribute="..."` in `html`, in order.
fn attribute_values(html: &str, attribute: &str) -> Vec<String> {
    let marker = format!("{attribute}=\"");
    html.split(&marker)
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

/// Fails in CI, skips otherwise.
fn unavailable(reason: &str) -> Result<()> {
    if std::env::var("CI").is_ok_and(|value| value == "true" || value == "1") {
        bail!("the gallery test needs Chromium, and CI requires it: {reason}");
    }
    eprintln!("SKIPPED: the gallery's browser checks need Chromium: {reason}");
    Ok(())
}

/// Chromium on the `PATH` (Debian's package installs `chromium`).
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|folder| ["chromium", "chromium-browser"].map(|name| folder.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Headless Chromium with a profile of its own.
struct Browser {
    binary: PathBuf,
    profile: PathBuf,
}

impl Browser {
    fn new(binary: PathBuf, profile: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&profile)?;
        Ok(Self { binary, profile })
    }

    /// Runs Chromium on `url` with `extra` flags; its stdout.
    async fn run(&self, url: &str, extra: &[String]) -> Result<Vec<u8>> {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args([
                "--headless",
                // The tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                // Waits for the page's images before it answers.
                "--virtual-time-budget=10000",
            ])
            .arg(format!("--user-data-dir={}", self.profile.display()))
            .args(extra)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(90), command.output())
            .await
            .with_context(|| format!("chromium on {url} took over 90 s"))??;
        ensure!(
            output.status.success(),
            "chromium on {url} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output.stdout)
    }

    /// The page's DOM once loaded, as HTML.
    async fn dump_dom(&self, url: &str) -> Result<String> {
        Ok(String::from_utf8(
            self.run(url, &["--dump-dom".to_string()]).await?,
        )?)
    }

    /// A screenshot of the page in a window of `size`, saved to `path`.
    async fn screenshot(&self, url: &str, path: &Path, size: (u32, u32)) -> Result<RgbImage> {
        self.run(
            url,
            &[
                format!("--screenshot={}", path.display()),
                format!("--window-size={},{}", size.0, size.1),
            ],
        )
        .await?;
        decode(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
    }
}
