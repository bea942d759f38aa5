//! The three requests the prompt stage sends to the LLM, and their wording.
//!
//! As in the SynCD reference: one system role (an expert in image captions for object
//! categories) and three user prompts. Rigid objects get background captions with their Cap3D
//! caption as the object; deformable categories (animals) get background captions that must name
//! the category, with a third guideline asking for different styles, and separately detailed
//! descriptions of the animal itself. Every prompt asks for factual, terse captions without
//! emotional words or speculation, because these captions become FLUX prompts and anything that
//! is not visible in an image only adds noise.

use super::cleaning::indefinite_article;
use serde::Serialize;
use std::fmt;

/// The system message of every request.
pub const SYSTEM_ROLE: &str =
    "You are an expert at suggesting image captions for different object categories.";

/// The shared instruction that keeps captions to what an image shows.
const FACTUAL_ONLY: &str = "Keep each caption factual, terse and complete. Do not add \
    unnecessary adjectives or emotion words. Do not speculate about anything that is not part of \
    the image, such as how it makes a viewer feel or what it inspires: such interpretations are \
    not part of the image itself.";

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// Backgrounds for a rigid Objaverse asset, described by its Cap3D caption.
    RigidBackgrounds,
    /// Backgrounds for an animal category; every caption names the category.
    DeformableBackgrounds,
    /// Detailed visual descriptions of the animal itself (colour, markings, subspecies).
    DeformableDescriptions,
}

impl RequestKind {
    /// What the request's lines are, for messages and logs.
    pub fn describe(&self) -> &'static str {
        match self {
            RequestKind::RigidBackgrounds => "rigid background captions",
            RequestKind::DeformableBackgrounds => "deformable background captions",
            RequestKind::DeformableDescriptions => "deformable descriptions",
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// One chat message of the OpenAI chat-completions API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system",
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user",
            content: content.into(),
        }
    }
}

/// The messages of one request: the system role and the user prompt.
pub fn messages(kind: RequestKind, subject: &str, count: u32) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(SYSTEM_ROLE),
        ChatMessage::user(user_prompt(kind, subject, count)),
    ]
}

/// The user prompt asking for `count` lines of `kind` about `subject` (a Cap3D caption for rigid
/// objects, a category word for deformable ones).
pub fn user_prompt(kind: RequestKind, subject: &str, count: u32) -> String {
    let subject = subject.trim();
    match kind {
        RequestKind::RigidBackgrounds => format!(
            "Suggest {count} captions for images of the following object: {subject}\n\
             Each caption describes the background around the object. {FACTUAL_ONLY}\n\
             Follow these guidelines:\n\
             1. Place the object in different backgrounds and scenes.\n\
             2. Place the object next to another object in the scene.\n\
             Write each caption on its own line.\n\n\
             Example captions for the object \"a red plastic bucket\":\n\
             1. A red plastic bucket on the concrete floor of a garden shed.\n\
             2. A red plastic bucket beside a coiled green hose on a wooden deck.\n\n\
             Example captions for the object \"a grey armchair\":\n\
             1. A grey armchair in a hotel lobby with marble floors.\n\
             2. A grey armchair next to a floor lamp and a bookshelf in a living room."
        ),
        RequestKind::DeformableBackgrounds => {
            let category = subject.to_lowercase();
            let a = indefinite_article(&category);
            format!(
                "Suggest {count} captions for images of {a} {category}. The word \"{category}\" \
                 must appear in every caption. Each caption briefly describes the background. \
                 {FACTUAL_ONLY}\n\
                 Follow these guidelines:\n\
                 1. Show the {category} in different backgrounds and scenes.\n\
                 2. Show the {category} with another object in the scene.\n\
                 3. Show the {category} in different styles, such as a watercolor painting or a \
                 pencil sketch.\n\
                 Write each caption on its own line.\n\n\
                 Example captions for the category \"cat\":\n\
                 1. A photo of a tabby cat resting in a garden full of wildflowers.\n\
                 2. A cat sitting beside a stack of books in a library.\n\
                 3. A watercolor painting of a cat on a windowsill."
            )
        }
        RequestKind::DeformableDescriptions => {
            let category = subject.to_lowercase();
            let a = indefinite_article(&category);
            format!(
                "Suggest {count} captions for images of {a} {category}. The word \"{category}\" \
                 must appear in every caption. Each caption gives detailed visual information \
                 about the {category} itself, including its colour, markings and subspecies, and \
                 nothing about the background or the scene. {FACTUAL_ONLY}\n\
                 Write each caption on its own line.\n\n\
                 Example captions for the category \"cat\":\n\
                 1. The siamese cat has blue almond-shaped eyes and cream fur with dark brown \
                 points on its ears, face, paws and tail.\n\
                 2. The long-haired maine coon cat has a bushy tail and thick fur striped in \
                 brown, black and white.\n\
                 3. The bengal cat has a short marbled coat of orange and black spots."
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_carry_count_subject_and_guidelines() {
        let rigid = user_prompt(
            RequestKind::RigidBackgrounds,
            "A wooden chair with a woven seat.",
            10,
        );
        assert!(rigid.starts_with(
            "Suggest 10 captions for images of the following object: A wooden chair with a woven seat."
        ));
        assert!(rigid.contains("next to another object"));
        assert!(!rigid.contains("styles"));

        let backgrounds = user_prompt(RequestKind::DeformableBackgrounds, "Alpaca", 25);
        assert!(backgrounds.starts_with("Suggest 25 captions for images of an alpaca."));
        assert!(backgrounds.contains("The word \"alpaca\" must appear in every caption"));
        assert!(backgrounds.contains("different styles, such as a watercolor painting"));

        let descriptions = user_prompt(RequestKind::DeformableDescriptions, "Fox", 25);
        assert!(descriptions.starts_with("Suggest 25 captions for images of a fox."));
        assert!(descriptions.contains("colour, markings and subspecies"));
        assert!(descriptions.contains("nothing about the background"));
    }

    #[test]
    fn every_request_has_the_system_role_first() {
        let messages = messages(RequestKind::DeformableDescriptions, "cat", 5);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0], ChatMessage::system(SYSTEM_ROLE));
        assert_eq!(messages[1].role, "user");
    }
}
