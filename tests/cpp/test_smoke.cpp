#include <gtest/gtest.h>
#include <addnorm/addnorm.h>
TEST(Smoke, Version) { EXPECT_STREQ(addnorm::version(), "0.1.0"); }
