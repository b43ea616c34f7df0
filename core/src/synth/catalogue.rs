//! The catalogue behind the question texts: topics, their statements, events and activities
//! (each with its polarity), the wordings of each kind of item and their answer scales.
//!
//! Its own module because it is fixed English text, apart from the latent model that gives
//! each question its numbers: it is what makes the survey embeddable by a real LLM.

/// What kind of item a catalogue entry is, which decides its wording and scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A statement, asked on an agree/disagree scale.
    Statement,
    /// A future event (a clause), asked on a likelihood scale.
    Event,
    /// An activity (a verb phrase), asked on a frequency scale.
    Activity,
}

impl Kind {
    pub(super) fn index(self) -> usize {
        match self {
            Kind::Statement => 0,
            Kind::Event => 1,
            Kind::Activity => 2,
        }
    }

    /// The two scales of this kind; variant 0 of an item picks one, variant 1 the other.
    pub(super) fn scales(self) -> [&'static [&'static str]; 2] {
        match self {
            Kind::Statement => [AGREE4, AGREE5],
            Kind::Event => [LIKELY4, LIKELY5],
            Kind::Activity => [FREQ5, FREQ4],
        }
    }

    /// The question text for `body` in wording `variant` (0 or 1).
    pub(super) fn wording(self, variant: usize, topic: &str, body: &str) -> String {
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
pub(super) const REFUSED: &str = "Refused";

/// One topic of the catalogue. Every entry carries its polarity: +1 when agreeing (or
/// "likely", or "often") goes with the topic's positive direction, −1 when against it.
pub(super) struct Topic {
    pub(super) name: &'static str,
    statements: [(&'static str, i8); 6],
    events: [(&'static str, i8); 2],
    activities: [(&'static str, i8); 2],
}

pub(super) const TOPICS: &[Topic] = &[
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
pub(super) struct Item {
    pub(super) topic: usize,
    pub(super) kind: Kind,
    pub(super) body: &'static str,
    pub(super) polarity: f64,
}

pub(super) fn catalogue() -> Vec<Item> {
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
