#pragma once

// Symbols of libaddnorm that C++ applications may use.
#if defined(ADDNORM_BUILDING_LIBRARY)
#define ADDNORM_API __attribute__((visibility("default")))
#else
#define ADDNORM_API
#endif
