//! The seeded synthetic survey: the project's built-in default dataset.
//!
//! Real survey data (OpinionQA, GlobalOpinionQA) and LLM embeddings are large, licensed and
//! slow to produce; every test, demo and smoke run instead needs a dataset that exists
//! everywhere, is identical on every machine for a seed, and is *learnable* in GPO's sense.
//! This module generates one from a small latent model:
//!
//! - each group g has a stance `s_g ∈ R^latent`, drawn `N(0, 1.5²)` per dimension;
//! - each question q belongs to a topic, has a unit loading `t_q` near its topic's
//!   direction, a polarity `p_q = ±1` (how its statement is framed) and a small bias `b_q`;
//! - the group's attitude is `a = p_q (s_g · t_q) + b_q`; its answer distribution over the
//!   K ordinal options (1 = most positive) is `softmax_k(-(k − c(a))² / 2σ_q²)` with
//!   centre `c(a) = 1 + (K − 1)·sigmoid(−a)`, mixed with 1% uniform;
//! - the "embedding" of option k of q is a fixed random projection of features of
//!   (`p_q t_q`, the option's centred ordinal position and its products with `p_q t_q`,
//!   `b_q` and `1/σ_q²`, the topic and the kind of scale), plus small Gaussian noise.
//!
//! So a model that sees a group's answers to a few context questions can infer `s_g` and
//! predict the rest, while the mean over training groups cannot. The question texts are
//! real English sentences so that the same survey can also be embedded by a real LLM.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::data::{AnswerOption, Group, MetricKind, Question, Survey};
use crate::prompt::Template;
use crate::rng::Rng;
use crate::store::{text_key, StoreMeta};

/// The embedder name of synthetic embeddings (part of every key they are stored under).
pub const EMBEDDER: &str = "synthetic-latent/v1";

/// Standard deviation of each stance coordinate: large, so groups differ substantially.
const STANCE_SD: f64 = 1.5;
/// How far a question's loading strays from its topic's direction (before normalizing), by
/// default.
const LOADING_SPREAD: f64 = 0.7;
/// Standard deviation of the per-question bias.
const BIAS_SD: f64 = 0.4;
/// Range of the per-question answer spread σ, in ordinal steps.
const SIGMA_RANGE: (f64, f64) = (0.55, 1.1);
/// Weight of the uniform distribution mixed into every answer distribution.
const UNIFORM_MIX: f64 = 0.01;
/// Share of questions that offer a "Refused" option.
const REFUSAL_SHARE: f64 = 0.3;

// RNG stream tags: each independent piece of the world draws from its own keyed stream,
// so e.g. adding groups never changes the questions.
const S_ORDER: u64 = 1;
const S_TOPIC: u64 = 2;
const S_QUESTION: u64 = 3;
const S_GROUP: u64 = 4;
const S_PROJECTION: u64 = 5;
const S_NOISE: u64 = 6;
const S_SCALE: u64 = 7;
const S_PERSON: u64 = 8;
/// Spread of an individual's stance around their group's.
const PERSON_SD: f64 = 0.5;

/// Parameters of the synthetic survey. Every field has a default, so a config may name
/// only the fields it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Seed of everything; same seed, same survey.
    pub seed: u64,
    /// Number of questions.
    pub n_questions: usize,
    /// Number of groups.
    pub n_groups: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Dimension of the groups' latent stances.
    pub latent: usize,
    /// Standard deviation of the Gaussian noise added to every embedding coordinate
    /// (coordinates have roughly unit scale).
    pub noise: f32,
    /// When above 0, the survey's "groups" are individual users instead: this many per
    /// latent group, each with a stance drawn around the group's, answering one option per
    /// question (a one-hot distribution sampled from their own); scored by accuracy.
    pub individuals_per_group: usize,
    /// How far each question's loading strays from its topic's direction (before
    /// normalizing). The stray part is visible to the labelled-synthetic embeddings but not
    /// in the question's text, so a lower spread leaves more of the structure to a text
    /// embedder.
    pub loading_spread: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            n_questions: 80,
            n_groups: 24,
            dim: 32,
            latent: 4,
            noise: 0.05,
            individuals_per_group: 0,
            loading_spread: LOADING_SPREAD,
        }
    }
}

impl SynthConfig {
    /// Rejects configs that would produce an empty or meaningless survey.
    /// [`generate`] never panics, but only a valid config gives a useful dataset.
    pub fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("synthetic `{name}` is {v}, expected {lo}..={hi}"))
            }
        };
        check("n_questions", self.n_questions, 1, 100_000)?;
        check("n_groups", self.n_groups, 1, 100_000)?;
        check("dim", self.dim, 1, 65_536)?;
        check("latent", self.latent, 1, 1_024)?;
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(format!(
                "synthetic `noise` is {}, expected a finite value >= 0",
                self.noise
            ));
        }
        if !(self.loading_spread.is_finite() && self.loading_spread >= 0.0) {
            return Err(format!(
                "synthetic `loading_spread` is {}, expected a finite value >= 0",
                self.loading_spread
            ));
        }
        Ok(())
    }
}

/// A generated survey with its embeddings.
#[derive(Debug, Clone)]
pub struct SynthOutput {
    /// The survey (Wasserstein metric; every group answers every question).
    pub survey: Survey,
    /// Embedder name of the vectors: [`EMBEDDER`].
    pub embedder: String,
    /// Template the keys were computed with: [`Template::Plain`].
    pub template: Template,
    /// Length of every vector.
    pub dim: usize,
    /// One `(text_key, vector)` per answerable (question, option), in question then
    /// option order.
    pub embeddings: Vec<(String, Vec<f32>)>,
}

impl SynthOutput {
    /// The metadata of an embedding store holding these vectors.
    pub fn store_meta(&self) -> StoreMeta {
        StoreMeta {
            embedder: self.embedder.clone(),
            template: self.template.name().to_string(),
            dim: self.dim,
            synthetic: true,
        }
    }
}

/// What kind of item a catalogue entry is, which decides its wording and scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A statement, asked on an agree/disagree scale.
    Statement,
    /// A future event (a clause), asked on a likelihood scale.
    Event,
    /// An activity (a verb phrase), asked on a frequency scale.
    Activity,
}

impl Kind {
    fn index(self) -> usize {
        match self {
            Kind::Statement => 0,
            Kind::Event => 1,
            Kind::Activity => 2,
        }
    }

    /// The two scales of this kind; variant 0 of an item picks one, variant 1 the other.
    fn scales(self) -> [&'static [&'static str]; 2] {
        match self {
            Kind::Statement => [AGREE4, AGREE5],
            Kind::Event => [LIKELY4, LIKELY5],
            Kind::Activity => [FREQ5, FREQ4],
        }
    }

    /// The question text for `body` in wording `variant` (0 or 1).
    fn wording(self, variant: usize, topic: &str, body: &str) -> String {
        match (self, variant) {
            (Kind::Statement, 0) => {
                format!("Do you agree or disagree with the following statement? {body}")
            }
            (Kind::Statement, _) => format!(
                "Thinking about {topic}, how much do you agree or disagree with this \
                 statement? {body}"
            ),
            (Kind::Event, 0) => format!("How likely do you think it is that {body}?"),
            (Kind::Event, _) => format!("Thinking about {topic}, how likely is it that {body}?"),
            (Kind::Activity, 0) => format!("How often do you {body}?"),
            (Kind::Activity, _) => format!("In a typical month, how often do you {body}?"),
        }
    }
}

const AGREE4: &[&str] = &[
    "Strongly agree",
    "Somewhat agree",
    "Somewhat disagree",
    "Strongly disagree",
];
const AGREE5: &[&str] = &[
    "Strongly agree",
    "Somewhat agree",
    "Neither agree nor disagree",
    "Somewhat disagree",
    "Strongly disagree",
];
const LIKELY4: &[&str] = &[
    "Very likely",
    "Somewhat likely",
    "Not too likely",
    "Not at all likely",
];
const LIKELY5: &[&str] = &[
    "Very likely",
    "Somewhat likely",
    "Neither likely nor unlikely",
    "Somewhat unlikely",
    "Very unlikely",
];
const FREQ5: &[&str] = &["Very often", "Often", "Sometimes", "Rarely", "Never"];
const FREQ4: &[&str] = &["Often", "Sometimes", "Rarely", "Never"];
const REFUSED: &str = "Refused";

/// One topic of the catalogue. Every entry carries its polarity: +1 when agreeing (or
/// "likely", or "often") goes with the topic's positive direction, −1 when against it.
struct Topic {
    name: &'static str,
    statements: [(&'static str, i8); 6],
    events: [(&'static str, i8); 2],
    activities: [(&'static str, i8); 2],
}

const TOPICS: &[Topic] = &[
    Topic {
        name: "the economy",
        statements: [
            ("The government should do more to reduce the gap between rich and poor.", 1),
            ("Raising the minimum wage would help working families more than it would hurt businesses.", 1),
            ("Large corporations should pay more in taxes than they do now.", 1),
            ("Cutting taxes is the best way to help the economy grow.", -1),
            ("Government regulation of business usually does more harm than good.", -1),
            ("People who work hard can get ahead no matter where they start.", -1),
        ],
        events: [
            ("the economy will be stronger a year from now", -1),
            ("your household income will fall behind the cost of living next year", 1),
        ],
        activities: [
            ("worry about being able to pay your monthly bills", 1),
            ("invest money in the stock market", -1),
        ],
    },
    Topic {
        name: "the environment",
        statements: [
            ("Stricter environmental laws are worth the cost.", 1),
            ("The country should phase out coal power as quickly as possible.", 1),
            ("Climate change is the most serious threat facing future generations.", 1),
            ("Environmental rules cost too many jobs.", -1),
            ("Expanding oil and gas drilling should be a national priority.", -1),
            ("Concern about climate change is exaggerated by the news.", -1),
        ],
        events: [
            ("renewable sources will supply most of the country's electricity within twenty years", 1),
            ("your area will experience a serious drought or flood in the next five years", 1),
        ],
        activities: [
            ("recycle paper, glass or plastic at home", 1),
            ("drive a car when you could walk or cycle instead", -1),
        ],
    },
    Topic {
        name: "technology",
        statements: [
            ("Technology has made life easier for most people.", 1),
            ("Self-driving cars will make the roads safer.", 1),
            ("Children benefit from learning to use computers at an early age.", 1),
            ("Artificial intelligence will eliminate more jobs than it creates.", -1),
            ("Tech companies collect too much personal information about their users.", -1),
            ("Social media does more harm than good to society.", -1),
        ],
        events: [
            ("a computer program will be able to do your job within twenty years", -1),
            ("most new cars will drive themselves a decade from now", 1),
        ],
        activities: [
            ("use a smartphone to pay for things in stores", 1),
            ("deliberately stay offline for a whole day", -1),
        ],
    },
    Topic {
        name: "health care",
        statements: [
            ("It is the government's responsibility to make sure everyone has health coverage.", 1),
            ("Prescription drug prices should be capped by law.", 1),
            ("The health care system works better for the wealthy than for everyone else.", 1),
            ("Private insurance gives patients better care than a government plan would.", -1),
            ("People should be responsible for paying for their own medical care.", -1),
            ("The quality of medical care in this country is among the best in the world.", -1),
        ],
        events: [
            ("you will have trouble paying a medical bill in the coming year", 1),
            ("a cure for most types of cancer will be found within thirty years", -1),
        ],
        activities: [
            ("put off seeing a doctor because of the cost", 1),
            ("exercise for at least half an hour", -1),
        ],
    },
    Topic {
        name: "education",
        statements: [
            ("Public colleges should be free for students from low-income families.", 1),
            ("Teachers in public schools are paid too little.", 1),
            ("The government should forgive some student loan debt.", 1),
            ("Parents should be able to use public money to send their children to private schools.", -1),
            ("A four-year college degree is no longer worth the cost.", -1),
            ("Schools spend too much time on subjects that are not useful in the job market.", -1),
        ],
        events: [
            ("the next generation will be better educated than yours", 1),
            ("most college classes will be taught online fifteen years from now", -1),
        ],
        activities: [
            ("read a book for pleasure", 1),
            ("take a class to learn a new skill", 1),
        ],
    },
    Topic {
        name: "immigration",
        statements: [
            ("Immigrants strengthen the country through their hard work and talents.", 1),
            ("The country should accept more refugees who are fleeing war.", 1),
            ("Immigrants who came here illegally as children should be allowed to stay.", 1),
            ("Immigrants today are a burden because they take jobs and housing.", -1),
            ("The country should build more barriers along its borders.", -1),
            ("The number of people allowed to move here each year should be reduced.", -1),
        ],
        events: [
            ("immigration will be higher ten years from now than it is today", 1),
            ("your community will become more diverse over the next decade", 1),
        ],
        activities: [
            ("talk with people who were born in another country", 1),
            ("hear a language other than English spoken in your neighborhood", 1),
        ],
    },
    Topic {
        name: "crime and policing",
        statements: [
            ("Police officers should be required to wear body cameras while on duty.", 1),
            ("The criminal justice system treats some groups more harshly than others.", 1),
            ("Money spent on prisons would be better spent on crime prevention programs.", 1),
            ("The police should be given more funding to patrol neighborhoods.", -1),
            ("Courts are too lenient on people convicted of violent crimes.", -1),
            ("Stricter punishments are the most effective way to reduce crime.", -1),
        ],
        events: [
            ("you will be the victim of a crime in the next year", -1),
            ("crime in your area will go down over the next five years", 1),
        ],
        activities: [
            ("lock your doors during the day when you are at home", -1),
            ("feel unsafe walking alone at night near your home", -1),
        ],
    },
    Topic {
        name: "the news media",
        statements: [
            ("News organizations do a good job of keeping the public informed.", 1),
            ("Local newspapers are important to the health of a community.", 1),
            ("Journalists generally try to report the facts accurately.", 1),
            ("The news media are biased against people like me.", -1),
            ("Most of what is shared on social media about politics is false or misleading.", -1),
            ("News organizations care more about ratings than about the truth.", -1),
        ],
        events: [
            ("your local newspaper will still be publishing ten years from now", 1),
            ("false stories online will sway the outcome of the next national election", -1),
        ],
        activities: [
            ("follow the national news", 1),
            ("get your news from social media posts", -1),
        ],
    },
    Topic {
        name: "science",
        statements: [
            ("Scientists should take an active role in public policy debates.", 1),
            ("Government investment in basic scientific research usually pays off.", 1),
            ("Vaccines are safe and their benefits outweigh their risks.", 1),
            ("Scientific findings are often influenced by the researchers' personal beliefs.", -1),
            ("Ordinary people's common sense is as reliable as scientists' expertise.", -1),
            ("Genetically modified foods are worse for your health than other foods.", -1),
        ],
        events: [
            ("humans will land on Mars within the next twenty-five years", 1),
            ("a new pandemic will disrupt daily life within the next ten years", 1),
        ],
        activities: [
            ("read or watch stories about new scientific discoveries", 1),
            ("look up medical advice online instead of asking a doctor", -1),
        ],
    },
    Topic {
        name: "your local community",
        statements: [
            ("People in your neighborhood are willing to help one another.", 1),
            ("Volunteering is an important part of being a good citizen.", 1),
            ("Most people can be trusted.", 1),
            ("People today are more isolated from their neighbors than they used to be.", -1),
            ("Local government ignores the concerns of people like me.", -1),
            ("Your community is a worse place to live than it was ten years ago.", -1),
        ],
        events: [
            ("you will still be living in the same community five years from now", 1),
            ("a new park or community center will open near you in the next few years", 1),
        ],
        activities: [
            ("attend a local meeting or community event", 1),
            ("talk with your neighbors", 1),
        ],
    },
];

/// One catalogue entry, flattened.
#[derive(Debug, Clone, Copy)]
struct Item {
    topic: usize,
    kind: Kind,
    body: &'static str,
    polarity: f64,
}

fn catalogue() -> Vec<Item> {
    let mut items = Vec::new();
    for (topic, t) in TOPICS.iter().enumerate() {
        let mut push = |kind, list: &[(&'static str, i8)]| {
            for &(body, p) in list {
                items.push(Item {
                    topic,
                    kind,
                    body,
                    polarity: f64::from(p),
                });
            }
        };
        push(Kind::Statement, &t.statements);
        push(Kind::Event, &t.events);
        push(Kind::Activity, &t.activities);
    }
    items
}

/// Latent parameters of one question.
#[derive(Debug, Clone)]
struct QuestionParams {
    topic: usize,
    kind: Kind,
    /// Polarity times the unit loading: `p_q t_q`.
    loading: Vec<f64>,
    bias: f64,
    sigma: f64,
    /// Number of ordinal (non-refusal) options.
    k: usize,
}

/// The whole latent world behind a generated survey.
#[derive(Debug, Clone)]
struct World {
    questions: Vec<Question>,
    params: Vec<QuestionParams>,
    stances: Vec<Vec<f64>>,
}

fn normals(rng: &mut Rng, n: usize, sd: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * sd).collect()
}

fn normalized(v: Vec<f64>) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 && n.is_finite() {
        v.into_iter().map(|x| x / n).collect()
    } else {
        v.into_iter().map(|_| 0.0).collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn build_world(cfg: &SynthConfig) -> World {
    let seed = cfg.seed;
    let items = catalogue();
    let order = Rng::keyed(&[seed, S_ORDER]).permutation(items.len());
    let topic_dirs: Vec<Vec<f64>> = (0..TOPICS.len())
        .map(|t| {
            normalized(normals(
                &mut Rng::keyed(&[seed, S_TOPIC, t as u64]),
                cfg.latent,
                1.0,
            ))
        })
        .collect();
    let width = cfg.n_questions.to_string().len().max(3);

    let mut questions = Vec::with_capacity(cfg.n_questions);
    let mut params = Vec::with_capacity(cfg.n_questions);
    let mut seen = HashSet::with_capacity(cfg.n_questions);
    for i in 0..cfg.n_questions {
        let slot = order[i % items.len()];
        let item = items[slot];
        let variant = (i / items.len()) % 2;
        let wave = i / (2 * items.len());

        let mut text = item
            .kind
            .wording(variant, TOPICS[item.topic].name, item.body);
        if wave > 0 {
            text.push_str(&format!(" (Wave {})", wave + 1));
        }
        if !seen.insert(text.clone()) {
            // The catalogue's bodies are distinct, so this never happens; keep keys unique
            // regardless.
            text.push_str(&format!(" (Question {})", i + 1));
            seen.insert(text.clone());
        }

        let first = usize::from(Rng::keyed(&[seed, S_SCALE, slot as u64]).f64() < 0.5);
        let scale = item.kind.scales()[(first + variant) % 2];

        let mut rng = Rng::keyed(&[seed, S_QUESTION, i as u64]);
        let eps = normals(&mut rng, cfg.latent, cfg.loading_spread);
        let t: Vec<f64> = topic_dirs[item.topic]
            .iter()
            .zip(&eps)
            .map(|(u, e)| u + e)
            .collect();
        let loading: Vec<f64> = normalized(t)
            .into_iter()
            .map(|x| x * item.polarity)
            .collect();
        let bias = rng.normal() * BIAS_SD;
        let sigma = SIGMA_RANGE.0 + (SIGMA_RANGE.1 - SIGMA_RANGE.0) * rng.f64();
        let refusal = rng.f64() < REFUSAL_SHARE;

        let mut options: Vec<AnswerOption> = scale
            .iter()
            .enumerate()
            .map(|(k, &o)| AnswerOption {
                text: o.to_string(),
                ordinal: Some((k + 1) as f64),
                refusal: false,
            })
            .collect();
        if refusal {
            options.push(AnswerOption {
                text: REFUSED.to_string(),
                ordinal: None,
                refusal: true,
            });
        }
        questions.push(Question {
            id: format!("SYN{:0width$}", i + 1),
            text,
            options,
        });
        params.push(QuestionParams {
            topic: item.topic,
            kind: item.kind,
            loading,
            bias,
            sigma,
            k: scale.len(),
        });
    }

    let stances = (0..cfg.n_groups)
        .map(|g| {
            normals(
                &mut Rng::keyed(&[seed, S_GROUP, g as u64]),
                cfg.latent,
                STANCE_SD,
            )
        })
        .collect();
    World {
        questions,
        params,
        stances,
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Group answer distribution of a stance on a question, over its ordinal options.
fn distribution(p: &QuestionParams, stance: &[f64]) -> Vec<f32> {
    let a = dot(&p.loading, stance) + p.bias;
    let kf = p.k as f64;
    let centre = 1.0 + (kf - 1.0) * sigmoid(-a);
    let logits: Vec<f64> = (1..=p.k)
        .map(|k| {
            let d = k as f64 - centre;
            -d * d / (2.0 * p.sigma * p.sigma)
        })
        .collect();
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let probs: Vec<f64> = e
        .iter()
        .map(|x| (1.0 - UNIFORM_MIX) * x / z + UNIFORM_MIX / kf)
        .collect();
    let s: f64 = probs.iter().sum();
    probs.iter().map(|x| (x / s) as f32).collect()
}

/// Individual users around each latent group: a stance near the group's, and one chosen
/// option per question sampled from the individual's own distribution.
#[allow(clippy::type_complexity)]
fn individuals(
    cfg: &SynthConfig,
    world: &World,
) -> (Vec<Group>, Vec<Vec<Option<Vec<f32>>>>, MetricKind) {
    let mut groups = Vec::new();
    let mut answers = Vec::new();
    for (g, stance) in world.stances.iter().enumerate() {
        for i in 0..cfg.individuals_per_group {
            let mut rng = Rng::keyed(&[cfg.seed, S_PERSON, g as u64, i as u64]);
            let own: Vec<f64> = stance
                .iter()
                .map(|s| s + PERSON_SD * rng.normal())
                .collect();
            let row = world
                .params
                .iter()
                .map(|p| {
                    let d = distribution(p, &own);
                    let u = rng.f64() as f32;
                    let mut acc = 0f32;
                    let pick = d.iter().position(|&x| {
                        acc += x;
                        u < acc
                    });
                    let pick = pick.unwrap_or(d.len() - 1);
                    Some(
                        (0..d.len())
                            .map(|k| if k == pick { 1.0 } else { 0.0 })
                            .collect(),
                    )
                })
                .collect();
            groups.push(Group {
                name: format!("Synthetic:Group {:02} / user {:02}", g + 1, i + 1),
            });
            answers.push(row);
        }
    }
    (groups, answers, MetricKind::Accuracy)
}

/// Number of embedding features for a latent dimension.
fn n_features(latent: usize) -> usize {
    2 * latent + 7 + TOPICS.len() + 3
}

/// Features of option `k` (0-based among the ordinal options) of a question. The option's
/// centred position `r` enters divided by σ², the way it enters the answer logits.
fn features(p: &QuestionParams, k: usize) -> Vec<f64> {
    let r = k as f64 - (p.k as f64 - 1.0) / 2.0;
    let inv_var = 1.0 / (p.sigma * p.sigma);
    let mut f = Vec::with_capacity(n_features(p.loading.len()));
    f.extend(p.loading.iter().copied());
    f.extend(p.loading.iter().map(|l| 0.5 * r * l * inv_var));
    f.push(0.5 * r * inv_var);
    f.push(0.25 * r * r * inv_var);
    f.push(p.bias);
    f.push(0.5 * r * p.bias * inv_var);
    f.push(inv_var);
    f.push(if p.k == 5 { 1.0 } else { 0.0 });
    f.push(1.0);
    f.extend((0..TOPICS.len()).map(|t| if t == p.topic { 1.0 } else { 0.0 }));
    f.extend((0..3).map(|c| if c == p.kind.index() { 1.0 } else { 0.0 }));
    f
}

/// Generates the survey and its embeddings. Pure: same config, same output. A config
/// failing [`SynthConfig::validate`] yields a degenerate (possibly empty) survey rather
/// than a panic; a non-finite or negative `noise` counts as 0.
pub fn generate(cfg: &SynthConfig) -> SynthOutput {
    let world = build_world(cfg);
    let (groups, answers, metric) = if cfg.individuals_per_group > 0 {
        individuals(cfg, &world)
    } else {
        let answers: Vec<Vec<Option<Vec<f32>>>> = world
            .stances
            .iter()
            .map(|s| {
                world
                    .params
                    .iter()
                    .map(|p| Some(distribution(p, s)))
                    .collect()
            })
            .collect();
        let groups = (0..cfg.n_groups)
            .map(|g| Group {
                name: format!("Synthetic:Group {:02}", g + 1),
            })
            .collect();
        (groups, answers, MetricKind::Wasserstein)
    };
    let survey = Survey {
        name: format!("synthetic (seed {})", cfg.seed),
        metric,
        questions: world.questions,
        groups,
        answers,
    };

    let nf = n_features(cfg.latent);
    // Row scale keeps coordinates near unit variance for typical feature vectors.
    let scale = 1.0 / (nf as f64 / 4.0).sqrt().max(1.0);
    let projection: Vec<Vec<f64>> = (0..cfg.dim)
        .map(|i| {
            normals(
                &mut Rng::keyed(&[cfg.seed, S_PROJECTION, i as u64]),
                nf,
                scale,
            )
        })
        .collect();
    let noise = if cfg.noise.is_finite() && cfg.noise > 0.0 {
        f64::from(cfg.noise)
    } else {
        0.0
    };

    let template = Template::Plain;
    let mut embeddings = Vec::new();
    for (qi, (q, p)) in survey.questions.iter().zip(&world.params).enumerate() {
        let ordinal = q.options.iter().enumerate().filter(|(_, o)| !o.refusal);
        for (k, (oi, _)) in ordinal.enumerate() {
            let f = features(p, k);
            let mut rng = Rng::keyed(&[cfg.seed, S_NOISE, qi as u64, k as u64]);
            let x: Vec<f32> = projection
                .iter()
                .map(|row| (dot(row, &f) + noise * rng.normal()) as f32)
                .collect();
            let key = text_key(EMBEDDER, template.name(), &template.render(q, oi));
            embeddings.push((key, x));
        }
    }

    SynthOutput {
        survey,
        embedder: EMBEDDER.to_string(),
        template,
        dim: cfg.dim,
        embeddings,
    }
}

#[cfg(test)]
mod tests;
